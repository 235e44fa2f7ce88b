"""The split pre-flight scan and split reads on real ranks (``mpiexec -n 2..5``): for plain
text and JSON Lines, the matrix of tests/inputs/test_byteranges_formats.py through
``encode.scan_corpus`` on COMM_WORLD equals the one-rank scan (or its error, on every rank);
whole JSON Lines runs equal the rank-0 scan's file bit for bit (uneven chunk splits: 8
records per chunk over N ranks), with ids, and after --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.mpi(min_size=2)

INPUTS_DIR = Path(__file__).resolve().parent.parent / "inputs"


def formats_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "byteranges_formats", INPUTS_DIR / "test_byteranges_formats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("byteranges_formats", module)
    spec.loader.exec_module(module)
    return module


def mpi_scan(world, path: Path, spec, chunk: int) -> None:
    """The split scan on COMM_WORLD equals the one-rank scan on every rank; each rank's
    slices hold its records (gathered: every chunk in order)."""
    from mpiattn.commands.encode import scan_corpus
    from mpiattn.core.shard import partition
    from mpiattn.errors import InputError, UserError
    from mpiattn.inputs import byteranges as br
    from mpiattn.inputs import textstream
    from mpiattn.inputs.records import open_source
    from mpiattn.parallel import watchdog

    src = open_source(path, spec)
    try:
        whole, error = textstream.scan(path, spec=src, chunk=chunk), None
    except InputError as err:
        whole, error = None, str(err)
    try:
        info = scan_corpus(watchdog.watch(world), src, chunk)
    except UserError as err:
        assert err.agreed and str(err) == error, (str(err), error)
        return
    assert error is None, error
    assert (info.lines, info.ids, info.chunk_digests) == (whole.lines, whole.ids,
                                                          whole.chunk_digests)
    rank, ranks = world.Get_rank(), world.Get_size()
    mine = []
    for k, (a, b) in enumerate(info.slices):
        count, start = partition(min(chunk, info.lines - k * chunk), ranks, rank)
        items, ids, nbytes = br.read_records(src, a, b, k * chunk + start, info.ids)
        assert len(items) == count and nbytes == b - a
        mine.append((items, ids, nbytes))
    gathered = world.allgather(mine)
    read = 0
    for k, (_, items, ids, _) in enumerate(textstream.record_chunks(src, chunk)):
        got = [x for r in range(ranks) for x in gathered[r][k][0]]
        got_ids = [x for r in range(ranks) for x in (gathered[r][k][1] or [])]
        read += sum(gathered[r][k][2] for r in range(ranks))
        assert got == items and (got_ids if ids is not None else None) == ids
    assert read == path.stat().st_size


CASES = ["plain", "pairs", "crlf", "lone-cr", "bom", "no-final-end", "blank-lines"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("fmt", "ids"), [("text", ""), ("jsonl", ""), ("jsonl", "int"),
                                          ("jsonl", "str")])
def test_split_scan_on_real_ranks(world, shared_dir, fmt, ids, case):
    m = formats_module()
    made, written = m.INPUTS[case]
    path = shared_dir / f"{fmt}-{ids}-{case}.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    if world.Get_rank() == 0:
        m.write(path, m.make(fmt, ids=ids, **made), **written)
    world.Barrier()
    mpi_scan(world, path, m.spec_of(fmt, ids, made.get("pairs", False)), 7)


@pytest.mark.parametrize("where", ["middle", "range-start", "range-end", "kind", "line-1"])
@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_a_bad_record_in_each_ranks_range_on_real_ranks(world, shared_dir, fmt, where):
    """For every rank's range: a bad record in its middle, on its first line, on the last
    line before it; an id of another kind; a bad line 1: the one-rank scan's words on
    every rank."""
    from mpiattn.inputs import byteranges as br

    m = formats_module()
    if fmt == "text" and where in ("kind", "line-1"):
        pytest.skip("plain text has no ids")
    ranks = world.Get_size()
    ids = "int" if fmt == "jsonl" else ""
    lines = m.make(fmt, n=60, ids=ids)
    path = shared_dir / f"good.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    if world.Get_rank() == 0:
        m.write(path, lines)
    world.Barrier()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        ranges = [br.range_of(fh, size, r, ranks) for r in range(ranks)]
    for r, (a, b) in enumerate(ranges):
        k = {"middle": m.line_of(path, (a + b) // 2), "range-start": m.line_of(path, a),
             "range-end": m.line_of(path, a) - 1, "kind": m.line_of(path, (a + b) // 2),
             "line-1": 0}[where]
        if k < 0 or (where == "line-1" and r):
            continue
        bad = shared_dir / f"bad-{where}-{r}{path.suffix}"
        if world.Get_rank() == 0:
            if where == "kind":
                changed = list(lines)
                record = json.loads(changed[k])
                record["id"] = str(record["id"])
                changed[k] = json.dumps(record)
                bad.write_bytes(("\n".join(changed) + "\n").encode())
            else:
                bad.write_bytes(m.bad_bytes(lines, [k], fmt))
        world.Barrier()
        mpi_scan(world, bad, m.spec_of(fmt, ids, False), 8)


def test_split_jsonl_runs_equal_the_rank_0_scan_runs(world, shared_dir, minilm_dir):
    """Every run of RUNS (ids int / str / none, pairs) on N ranks, each rank reading its
    slices, gives the file of the rank-0 scan run on the same N ranks bit for bit; each
    rank's slices sum to the file once; a run stopped after two chunks resumes to it."""
    import h5py
    import numpy as np

    from mpiattn.errors import UserError

    m = formats_module()
    rank = world.Get_rank()
    for name, (lines, sets) in sorted(m.RUNS.items()):
        sets = [*sets, "parallel.tensor=1"]  # N data-parallel replicas (2 heads)
        path = shared_dir / f"{name}.jsonl"
        if rank == 0:
            m.write(path, lines, end="\r\n")
        world.Barrier()
        split = shared_dir / f"{name}-split.h5"
        whole = shared_dir / f"{name}-whole.h5"
        m.run(path, split, minilm_dir, sets, world=world)
        world.Barrier()
        m.run(path, whole, minilm_dir, sets, world=world, split=False)
        world.Barrier()
        if rank == 0:
            m.assert_same(m.datasets(split), m.datasets(whole))
            with h5py.File(split) as f:
                read = f["work/bytes_read"][()] - f["work/scan_bytes"][()]
                assert int(read.sum()) == path.stat().st_size  # each byte read once
                assert len(read) == world.Get_size() and (read < path.stat().st_size).all()
        if name != "ids-str":
            continue
        with m.failing_write(2), pytest.raises(UserError, match="cannot write chunk 2"):
            m.run(path, shared_dir / "cut.h5", minilm_dir, sets, world=world)
        world.Barrier()
        m.run(path, shared_dir / "cut.h5", minilm_dir, sets, world=world, resume="auto")
        world.Barrier()
        if rank == 0:
            a, b = m.datasets(shared_dir / "cut.h5"), m.datasets(whole)
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("fmt", ["txt.gz", "jsonl.bz2", "parquet"])
def test_rank_0_reads_a_stream_and_hands_each_rank_its_slice(world, shared_dir, minilm_dir,
                                                             fmt):
    """A stream that cannot be entered at a byte offset: rank 0 alone reads it (the scan
    and the chunks, twice its size), the other ranks read nothing and tokenize the slice
    rank 0 hands them; the rows equal the plain-text run's bit for bit. Changed after the
    scan (rank 0 rewrites it), the chunk rank 0 reads is refused on every rank in one
    line, and nothing is published."""
    import bz2
    import gzip

    import h5py

    from mpiattn.commands import encode
    from mpiattn.core.shard import partition
    from mpiattn.inputs import textstream

    m = formats_module()
    rank, ranks = world.Get_rank(), world.Get_size()
    lines = [f"sentence {i} {'word ' * (i % 7)}".strip() for i in range(30)]
    text = "".join(f"{line}\n" for line in lines)

    def write(path, lines):
        if fmt == "txt.gz":
            path.write_bytes(gzip.compress("".join(f"{x}\n" for x in lines).encode()))
        elif fmt == "jsonl.bz2":
            path.write_bytes(bz2.compress("".join(json.dumps({"text": x}) + "\n"
                                                  for x in lines).encode()))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": lines}), path, row_group_size=7)

    plain, path = shared_dir / f"{fmt}-plain.txt", shared_dir / f"c.{fmt}"
    if rank == 0:
        plain.write_text(text)
        write(path, lines)
    world.Barrier()
    sets = ["parallel.tensor=1", "input.chunk=8"]
    m.run(plain, shared_dir / f"{fmt}-plain.h5", minilm_dir, sets, world=world)
    m.run(path, shared_dir / f"{fmt}.h5", minilm_dir, sets, world=world)
    world.Barrier()
    if rank == 0:
        size = path.stat().st_size
        m.assert_same({k: v for k, v in m.datasets(shared_dir / f"{fmt}.h5").items()
                       if k != "input_format"},
                      {k: v for k, v in m.datasets(shared_dir / f"{fmt}-plain.h5").items()
                       if k != "input_format"})
        with h5py.File(shared_dir / f"{fmt}.h5") as f:
            assert f["work/scan_bytes"][()].tolist() == [size] + [0] * (ranks - 1)
            assert f["work/bytes_read"][()].tolist() == [2 * size] + [0] * (ranks - 1)
            tokenized = f["work/lines_tokenized"][()].tolist()
        want = [sum(partition(min(8, 30 - k), ranks, r)[0] for k in range(0, 30, 8))
                for r in range(ranks)]
        assert tokenized == want
    scan = encode.scan_corpus

    def scanned(world_, source, chunk):
        info = scan(world_, source, chunk)
        if rank == 0:  # one word of line 10 changes: chunk 1 is no longer what was scanned
            write(path, [x.replace("sentence 9 ", "sentence X ") for x in lines])
        world.Barrier()
        return info

    encode.scan_corpus = scanned
    try:
        with pytest.raises(textstream.InputChanged,
                           match=r"other (lines|rows) 9-16 \(chunk 1\)"):
            m.run(path, shared_dir / f"{fmt}-changed.h5", minilm_dir, sets, world=world)
    finally:
        encode.scan_corpus = scan
    world.Barrier()
    assert not (shared_dir / f"{fmt}-changed.h5").exists()

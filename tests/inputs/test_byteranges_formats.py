"""The split pre-flight scan (``encode.scan_corpus``, ``inputs.byteranges``) for every
format it splits (plain text, JSON Lines), with N ranks in threads: for each input of a
matrix (ids int / str / absent, pairs, blank lines, CRLF, a BOM, a bad record in each rank's
range and on a range boundary, an id kind that changes, a chunk boundary on a range
boundary), every rank's result equals the one-rank scan (``textstream.scan``): the record
count, the ids' kind, every chunk digest, or the very words of its error; and the ranks'
slices read back (``byteranges.read_records``) give every chunk's records and ids in order.
The same matrix runs on real ranks in tests/mpi/test_byteranges_mpi.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpiattn.core.shard import partition
from mpiattn.errors import InputError, UserError
from mpiattn.inputs import byteranges as br
from mpiattn.inputs import textstream
from mpiattn.inputs.records import Source, Spec, open_source


def sentence(i: int) -> str:
    return f"sentence {i} " + "word " * (i * 7 % 11)


def jsonl_line(i: int, ids: str, pairs: bool) -> str:
    record: dict = {"text": sentence(i)}
    if pairs:
        record["second"] = f"answer {i}" if i % 4 else ""
    if ids == "int":
        record["id"] = 1000 + i
    elif ids == "str":
        record["id"] = f"r-{i}"
    return json.dumps(record, ensure_ascii=False)


def text_line(i: int, ids: str, pairs: bool) -> str:
    return f"{sentence(i)}\t{'answer ' * (i % 3)}" if pairs else sentence(i)


def make(fmt: str, n: int = 40, ids: str = "", pairs: bool = False, bom: bool = False,
         blank_at: tuple[int, ...] = ()) -> list[str]:
    """``n`` lines (without ends) of ``fmt``; blank lines at ``blank_at``."""
    lines = [(jsonl_line if fmt == "jsonl" else text_line)(i, ids, pairs) for i in range(n)]
    for k in blank_at:
        lines[k] = "  "
    if bom:
        lines[0] = "\ufeff" + lines[0]
    return lines


def write(path: Path, lines: list[str], end: str = "\n", final_end: bool = True) -> bytes:
    data = (end.join(lines) + (end if final_end else "")).encode("utf-8")
    path.write_bytes(data)
    return data


def spec_of(fmt: str, ids: str, pairs: bool) -> Spec:
    if fmt == "text":
        return Spec(format="text", pairs=pairs)
    return Spec(format="jsonl", id_field="id" if ids else "", pairs=pairs,
                pair_field="second" if pairs else "")


def thread_scan(src: Source, ranks: int, chunk: int) -> list:
    """Each rank's ``encode.scan_corpus`` result (or error), ranks in threads."""
    from helpers import ThreadWorld, each_rank

    from mpiattn.commands.encode import scan_corpus

    world = ThreadWorld(ranks)
    return each_rank(ranks, lambda r: scan_corpus(world.member(r), src, chunk))


def check_against_one_rank(path: Path, spec: Spec, ranks: int, chunk: int) -> list:
    """Assert the split scan at ``ranks`` equals the one-rank scan; returns the results."""
    src = open_source(path, spec)
    try:
        whole, error = textstream.scan(path, spec=src, chunk=chunk), None
    except InputError as err:
        whole, error = None, str(err)
    got = thread_scan(src, ranks, chunk)
    if error is not None:
        assert all(isinstance(g, UserError) and g.agreed for g in got), got
        assert [str(g) for g in got] == [error] * ranks
        return got
    assert not any(isinstance(g, BaseException) for g in got), got
    size = path.stat().st_size
    for info in got:
        assert (info.lines, info.ids, info.chunk_digests, info.label, info.unit) == (
            whole.lines, whole.ids, whole.chunk_digests, whole.label, whole.unit)
        assert len(info.slices) == len(whole.chunk_digests)
    # every chunk's records and ids, read back from the ranks' slices, in order
    read = 0
    for k, (first, items, ids, digest) in enumerate(textstream.record_chunks(src, chunk)):
        got_items, got_ids = [], []
        for r, info in enumerate(got):
            count, start = partition(len(items), ranks, r)
            mine, mine_ids, nbytes = br.read_records(src, *info.slices[k], first + start,
                                                     info.ids)
            assert len(mine) == count and nbytes == info.slices[k][1] - info.slices[k][0]
            got_items += mine
            got_ids += mine_ids if mine_ids is not None else []
            read += nbytes
        assert got_items == items
        assert (got_ids if ids is not None else None) == ids
        assert textstream.chunk_digest(got_items, ids) == digest
    assert read == size  # the slices tile the file: each byte read once, by one rank
    return got


RANKS = [1, 2, 3, 5]
INPUTS = {  # name -> (make's keyword arguments, write's keyword arguments)
    "plain": ({}, {}),
    "pairs": ({"pairs": True}, {}),
    "crlf": ({}, {"end": "\r\n"}),
    "lone-cr": ({}, {"end": "\r"}),
    "bom": ({"bom": True}, {}),
    "no-final-end": ({}, {"final_end": False}),
    "blank-lines": ({"blank_at": (0, 9, 10, 31)}, {}),
    "blank-last": ({"blank_at": (39,)}, {}),
}


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", sorted(INPUTS))
@pytest.mark.parametrize(("fmt", "ids"), [("text", ""), ("jsonl", ""), ("jsonl", "int"),
                                          ("jsonl", "str")])
def test_split_scan_equals_the_one_rank_scan(tmp_path, fmt, ids, case, ranks):
    """Blank lines are the empty sentence in plain text and a one-line error (the first
    blank one's number) in JSON Lines, as the one-rank reader has them."""
    made, written = INPUTS[case]
    path = tmp_path / f"c.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    write(path, make(fmt, ids=ids, **made), **written)
    got = check_against_one_rank(path, spec_of(fmt, ids, made.get("pairs", False)), ranks, 7)
    if fmt == "jsonl" and "blank_at" in made:
        line = made["blank_at"][0] + 1
        assert f"line {line}: blank" in str(got[0])
    else:
        assert got[0].lines == 40 and got[0].ids == ids


def bad_bytes(lines: list[str], bad: list[int], fmt: str) -> bytes:
    """The file of ``lines`` with the lines ``bad`` (0-based) replaced by bad records of
    the same length in bytes (the ranges stay): a byte that is not UTF-8 (text), a text
    field that is a number (JSON Lines)."""
    data = bytearray("\n".join(lines).encode() + b"\n")
    for k in bad:
        at, n = sum(len(x.encode()) + 1 for x in lines[:k]), len(lines[k].encode())
        data[at:at + n] = (b"\xff" + b"x" * (n - 1) if fmt == "text" else
                           b'{"text": 5}' + b" " * (n - 11))
    return bytes(data)


def line_of(path: Path, offset: int) -> int:
    """The 0-based index of the line holding byte ``offset`` ("\\n" ends only)."""
    return path.read_bytes()[:offset].count(b"\n")


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize("where", ["middle", "range-start", "range-end"])
@pytest.mark.parametrize(("fmt", "ids"), [("text", ""), ("jsonl", "int"), ("jsonl", "")])
def test_a_bad_record_in_each_ranks_range_is_named_as_one_rank_names_it(
        tmp_path, fmt, ids, where, ranks):
    """A bad record in the middle of rank r's range, on its first line, or on the last
    line of the range before (a range boundary), for every r: the one-rank scan's error
    (its global line number) on every rank; a second bad record further on is not named."""
    lines = make(fmt, n=60, ids=ids)
    path = tmp_path / f"c.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    write(path, lines)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        ranges = [br.range_of(fh, size, r, ranks) for r in range(ranks)]
    for r, (a, b) in enumerate(ranges):
        if where == "middle":
            k = line_of(path, (a + b) // 2)
        elif where == "range-start":
            k = line_of(path, a)
        else:
            if r == 0:
                continue
            k = line_of(path, a) - 1  # the last line of rank r-1's range
        bad = tmp_path / f"bad-{r}{path.suffix}"
        bad.write_bytes(bad_bytes(lines, [k] + ([k + 5] if k + 5 < len(lines) else []), fmt))
        with open(bad, "rb") as fh:  # the same length: the same ranges
            assert [br.range_of(fh, size, q, ranks) for q in range(ranks)] == ranges
        got = check_against_one_rank(bad, spec_of(fmt, ids, False), ranks, 8)
        assert isinstance(got[0], InputError) and f"line {k + 1}:" in str(got[0]), got[0]


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize("changed", [1, 20, 45, 59])
def test_an_id_of_another_kind_is_named_against_line_1_in_any_range(tmp_path, ranks,
                                                                      changed):
    """Line 1's id is an integer; line ``changed`` (1-based) holds a string id, in rank
    0's range or a later one: "line N: id field 'id' is a string but line 1's is an
    integer" on every rank, as one rank words it (the ranks past the first never saw line
    1 in their range: each parsed it for the kind)."""
    lines = make("jsonl", n=60, ids="int")
    record = json.loads(lines[changed - 1])
    record["id"] = f"{record['id']}"
    lines[changed - 1] = json.dumps(record)
    path = tmp_path / "c.jsonl"
    write(path, lines)
    got = check_against_one_rank(path, spec_of("jsonl", "int", False), ranks, 8)
    if changed == 1:  # line 1 fixes the kind: then every integer after it is named
        assert "line 2: id field 'id' is an integer but line 1's is a string" in str(got[0])
    else:
        assert (f"line {changed}: id field 'id' is a string but line 1's is an integer"
                in str(got[0]))


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize("line1", ['{"text": "a", "id": 1.5}', '{"text": "a"}', "not json",
                                   "", '{"text": 3, "id": 1}'])
def test_a_bad_line_1_is_named_on_every_rank(tmp_path, ranks, line1):
    """Line 1 bad (its id not a string or an integer, absent, not JSON, blank, its text
    not a string): every rank's kind of the ids is unknown; line 1 is named, in rank 0's
    words, never a later line's kind mismatch."""
    lines = [line1, *make("jsonl", n=50, ids="str")[1:]]
    path = tmp_path / "c.jsonl"
    write(path, lines)
    got = check_against_one_rank(path, spec_of("jsonl", "str", False), ranks, 8)
    assert "line 1:" in str(got[0]), got[0]


class CountingReads:
    """A binary file that counts its ``read`` calls."""

    def __init__(self, fh) -> None:
        self.fh, self.reads = fh, 0

    def seek(self, pos: int) -> int:
        return self.fh.seek(pos)

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        return self.fh.read(n)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("block", [br.FIRST_BLOCK, br.TAIL_BLOCK])
def test_a_long_line_is_read_in_linear_time(tmp_path, end, block):
    """A line far longer than the block (a whole document on line 1 of a JSON Lines file,
    read for the ids' kind in ``FIRST_BLOCK`` blocks; a long record in a chunk's tail, in
    ``TAIL_BLOCK`` blocks): ``LineReader`` grows its reads with the line instead of
    copying the line so far once per block (a 16 MB line 1 took 16 s per rank, the
    one-rank scan 0.3 s). The lines are those of ``records.split_lines``."""
    import io

    from mpiattn.inputs.records import split_lines

    data = b"x" * (8 << 20) + b" \r y" + end + b"short" + end + b"last"
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as raw:
        fh = CountingReads(raw)
        reader = br.LineReader(fh, block)
        got = [line for _, line in reader.lines(0, len(data))]
    assert got == list(split_lines(io.BytesIO(data)))
    assert reader.read == len(data)
    assert fh.reads <= 2 * (len(data) // block).bit_length() + 4, fh.reads


@pytest.mark.parametrize(("ranks", "chunk", "n"), [(2, 4, 8), (3, 4, 12), (3, 2, 12),
                                                   (4, 3, 12), (5, 2, 20), (2, 1, 6)])
@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_a_chunk_boundary_on_a_range_boundary(tmp_path, fmt, ranks, chunk, n):
    """Lines of one length, so that rank r's range starts on line r*n/N, a chunk's first
    line: the split equals the one-rank scan and every slice holds its lines."""
    width = 40
    if fmt == "jsonl":
        lines = [json.dumps({"text": f"s{i:03d}", "id": i}) for i in range(n)]
        lines = [x[:-1] + " " * (width - len(x)) + "}" for x in lines]
    else:
        lines = [f"sentence number {i:03d}".ljust(width) for i in range(n)]
    path = tmp_path / f"c.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    write(path, lines)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        starts = [line_of(path, br.range_of(fh, size, r, ranks)[0]) for r in range(ranks)]
    assert starts == [r * n // ranks for r in range(ranks)]
    assert all(s % chunk == 0 for s in starts)  # each range starts a chunk
    got = check_against_one_rank(path, spec_of(fmt, "int" if fmt == "jsonl" else "", False),
                                 ranks, chunk)
    assert got[0].lines == n


def test_an_empty_jsonl_file_is_named_as_one_rank_names_it(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"")
    got = check_against_one_rank(path, Spec(format="jsonl"), 3, 4)
    assert "is empty (one JSON object per line)" in str(got[0])


def test_split_scan_bytes_are_counted(tmp_path):
    """``scan_bytes`` of a JSON Lines split scan with ids, per rank: its turn of the digest
    pieces, its range twice (count, check), then line 1 (for the ids' kind, read in
    ``FIRST_BLOCK`` blocks) and the tail of its last chunk (at most the chunk's bytes and
    one ``TAIL_BLOCK`` more)."""
    path = tmp_path / "c.jsonl"
    data = write(path, make("jsonl", n=3000, ids="str"))
    size, ranks, chunk = len(data), 3, 16
    got = check_against_one_rank(path, Spec(format="jsonl", id_field="id"), ranks, chunk)
    lines = data.split(b"\n")
    longest_chunk = max(sum(len(x) + 1 for x in lines[i:i + chunk])
                        for i in range(0, 3000, chunk))
    with open(path, "rb") as fh:
        ranges = [br.range_of(fh, size, r, ranks) for r in range(ranks)]
    for r, info in enumerate(got):
        pieces = br.piece_bytes(size, range(r, br.pieces_of(size), ranks))
        rest = info.scan_bytes - pieces - 2 * (ranges[r][1] - ranges[r][0])
        assert len(lines[0]) + 1 <= rest <= br.FIRST_BLOCK + longest_chunk + br.TAIL_BLOCK
    assert sum(br.piece_bytes(size, range(r, br.pieces_of(size), ranks))
               for r in range(ranks)) == size  # the digest reads the file once in all


def test_only_uncompressed_text_and_jsonl_are_split(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"a\n"))
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    names = ("a.txt", "a.txt.gz", "a.jsonl", "a.jsonl.gz", "a.parquet")
    assert [br.splittable(open_source(tmp_path / n, Spec())) for n in names] == [
        True, False, True, False, False]


# --- whole runs, one rank in this process (MPI.COMM_SELF) -----------------------------

TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.ffn=64",
        "input.chunk=8", "input.batch=4", 'output.layers="all"']


def run(path: Path, out: Path, minilm_dir: Path, sets: list[str], world=None,
        split: bool = True, resume: str | None = None) -> Path | None:
    """A text run through ``encode.run_text``; ``split=False`` takes the rank-0 scan and
    every-rank reads (the path of compressed streams) for the same file."""
    from contextlib import ExitStack
    from unittest import mock

    from mpi4py import MPI

    from mpiattn import config
    from mpiattn.commands import encode
    from mpiattn.parallel import watchdog

    cfg = config.load(None, [*TINY, f'input.tokenizer="{minilm_dir}/tokenizer.json"',
                             f'input.text="{path}"', *sets])
    with ExitStack() as stack:
        if not split:
            for module in (encode, br):
                stack.enter_context(mock.patch.object(module, "splittable",
                                                      lambda src: False))
        return encode.run_text(cfg, watchdog.watch(world or MPI.COMM_SELF), str(out),
                               force=False, resume=resume)


def failing_write(chunk: int):  # -> a context manager
    """A patch under which writing part ``chunk`` fails with a full disk (ENOSPC); the
    other parts are written."""
    from unittest import mock

    from mpiattn.io import corpusfile

    write_part = corpusfile.Parts.write

    def failing(self, index, result):
        if index == chunk:
            raise OSError(28, "No space left on device")
        write_part(self, index, result)

    return mock.patch.object(corpusfile.Parts, "write", failing)


def datasets(path: Path) -> dict:
    import h5py

    out: dict = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset)
                     and n.startswith(("input/", "output/", "layers/")) else None)
        out["input_format"] = f.attrs["input_format"]
    return out


def assert_same(a: dict, b: dict) -> None:
    import numpy as np

    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit for bit


RUNS = {  # name -> (file lines, extra sets)
    "ids-int": (make("jsonl", n=30, ids="int"), ['input.id_field="id"']),
    "ids-str": (make("jsonl", n=30, ids="str", bom=True), ['input.id_field="id"']),
    "no-ids": (make("jsonl", n=30), []),
    "pairs": (make("jsonl", n=30, ids="int", pairs=True),
              ['input.id_field="id"', "input.pairs=true", 'input.pair_field="second"']),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_split_jsonl_run_equals_the_rank_0_scan_run(tmp_path, minilm_dir, name):
    """JSON Lines (CRLF, ids int / str / none, pairs) split by byte ranges gives the same
    file, bit for bit, as the rank-0 scan with every rank reading every chunk; the ids
    land on their records; ``bytes_read`` is the scan's bytes and the file once."""
    import h5py

    lines, sets = RUNS[name]
    path = tmp_path / "c.jsonl"
    data = write(path, lines, end="\r\n")
    split = run(path, tmp_path / "split.h5", minilm_dir, sets)
    whole = run(path, tmp_path / "whole.h5", minilm_dir, sets, split=False)
    a, b = datasets(split), datasets(whole)
    assert_same(a, b)
    if name != "no-ids":
        assert a["input/id"].tolist()[:2] == ([1000, 1001] if name != "ids-str" else
                                               [b"r-0", b"r-1"])
    with h5py.File(split) as f, h5py.File(whole) as g:
        scan, read = int(f["work/scan_bytes"][0]), int(f["work/bytes_read"][0])
        assert read - scan == len(data)  # its slices: every chunk, once
        assert scan >= 3 * len(data)  # digest pieces, count, check (and line 1)
        assert int(g["work/scan_bytes"][0]) == len(data)  # the rank-0 scan, then
        assert int(g["work/bytes_read"][0]) == 2 * len(data)  # every chunk


def test_a_jsonl_id_changed_after_the_split_scan_is_caught(tmp_path, minilm_dir):
    """Only an id changes after the scan (same length): the chunk's digest holds the ids,
    so rank 0 refuses the chunk: one line, no output."""
    from mpiattn.commands import encode

    lines = make("jsonl", n=30, ids="int")
    path = tmp_path / "c.jsonl"
    write(path, lines)
    scan = encode.scan_corpus

    def scanned(world, source, chunk):
        info = scan(world, source, chunk)
        write(path, [x.replace('"id": 1012', '"id": 1099') for x in lines])
        return info

    encode.scan_corpus = scanned
    try:
        with pytest.raises(textstream.InputChanged, match=r"other lines 9-16 \(chunk 1\)"):
            run(path, tmp_path / "o.h5", minilm_dir, ['input.id_field="id"'])
    finally:
        encode.scan_corpus = scan
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("name", ["ids-str", "pairs"])
def test_a_split_jsonl_run_resumes_to_the_same_file(tmp_path, minilm_dir, name):
    """A run stopped by a failed write after its second chunk keeps two chunks; --resume
    reads only the rest by byte ranges and gives the uninterrupted run's file bit for bit."""
    from mpiattn.errors import UserError

    lines, sets = RUNS[name]
    path = tmp_path / "c.jsonl"
    write(path, lines)
    whole = run(path, tmp_path / "whole.h5", minilm_dir, sets)
    with failing_write(2), pytest.raises(UserError, match="cannot write chunk 2"):
        run(path, tmp_path / "cut.h5", minilm_dir, sets)
    (folder,) = tmp_path.glob(".cut.h5*.parts")
    assert sorted(p.name for p in folder.glob("chunk-*.h5")) == ["chunk-0000000.h5",
                                                                 "chunk-0000001.h5"]
    resumed = run(path, tmp_path / "cut.h5", minilm_dir, sets, resume="auto")
    assert_same(datasets(resumed), datasets(whole))

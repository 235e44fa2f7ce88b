"""The pre-flight scan split by byte ranges (``inputs.byteranges``), in one process: N
simulated ranks give exactly the one-rank scan's line count, chunk digests and bad-line
message, and each rank's slices hold exactly the lines it tokenizes."""

from __future__ import annotations

import re

import pytest

from mpiattn.core.shard import partition
from mpiattn.errors import InputError
from mpiattn.inputs import byteranges as br
from mpiattn.inputs import textstream
from mpiattn.inputs.records import Spec, open_source

# line ends of every kind, a BOM, blank lines, a "\r\n" and a lone "\r" at many offsets,
# long lines (a range boundary inside them), no final line end
EDGE = ("\ufeffα first line\n" + "".join(
    f"line {i} {'x' * (i * 7 % 53)}" + ("\n", "\r\n", "\r", "\n\n", "\r\r\n")[i % 5]
    for i in range(90)) + "   \n" + "y" * 3000 + "\r\nlast without an end").encode()


def split_scan(path, ranks: int, chunk: int, pairs: bool = False):
    """Every rank's steps as ``encode.scan_corpus`` takes them, without MPI."""
    src = open_source(path, Spec(format="text", pairs=pairs))
    size = path.stat().st_size
    with open(path, "rb") as fh:
        ranges = [br.range_of(fh, size, r, ranks) for r in range(ranks)]
        counts = [br.count_lines(fh, a, b, size)[0] for a, b in ranges]
    total = sum(counts)
    parts = [br.scan_part(src, size, a, b, sum(counts[:r]), counts[r], total, chunk, ranks)
             for r, (a, b) in enumerate(ranges)]
    digests, offsets = {}, {total: size}
    for part in parts:
        assert not set(part.digests) & set(digests)  # each chunk digested by one rank
        digests.update(part.digests)
        offsets.update(part.offsets)
    return src, ranges, total, [digests[k] for k in sorted(digests)], offsets, parts


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_ranges_give_the_one_rank_scan_and_each_ranks_slices(tmp_path, ranks, chunk):
    path = tmp_path / "edge.txt"
    path.write_bytes(EDGE)
    src, ranges, total, digests, offsets, parts = split_scan(path, ranks, chunk)
    whole = textstream.scan(path, spec=src, chunk=chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(EDGE)
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(ranks - 1))  # they tile
    assert total == whole.lines and tuple(digests) == whole.chunk_digests
    expected = [items for _, items in textstream.chunks(path, chunk, spec=src)]
    scanned = sum(p.bytes_read for p in parts)
    assert len(EDGE) <= scanned <= len(EDGE) + ranks * (br.TAIL_BLOCK + 3000)  # + tails
    for k, items in enumerate(expected):
        got = []
        for r in range(ranks):
            count, start = partition(len(items), ranks, r)
            a, b = offsets[k * chunk + start], offsets[k * chunk + start + count]
            mine, _, nbytes = br.read_records(src, a, b, k * chunk + start)
            assert len(mine) == count and nbytes == b - a
            got += mine
        assert got == items  # the lines, in order, each read by exactly one rank


def test_random_line_ends_at_every_rank_count(tmp_path):
    """Files of random short lines and line ends ("\n", "\r\n", "\r", blank lines, none
    at the end): ranges tile them and give the one-rank scan at 1-9 ranks."""
    import random

    rng = random.Random(26)
    for trial in range(40):
        pieces = [rng.choice(["", "a", "bc", " d ", "é"]) + rng.choice(["\n", "\r\n", "\r"])
                  for _ in range(rng.randint(1, 25))]
        if trial % 3 == 0:
            pieces.append("tail")
        path = tmp_path / f"r{trial}.txt"
        path.write_bytes("".join(pieces).encode())
        ranks, chunk = rng.randint(1, 9), rng.randint(1, 6)
        src, _, total, digests, offsets, _ = split_scan(path, ranks, chunk)
        whole = textstream.scan(path, spec=src, chunk=chunk)
        assert (total, tuple(digests)) == (whole.lines, whole.chunk_digests), pieces
        expected = [items for _, items in textstream.chunks(path, chunk, spec=src)]
        for k, items in enumerate(expected):
            got = []
            for r in range(ranks):
                count, start = partition(len(items), ranks, r)
                at = k * chunk + start
                got += br.read_records(src, offsets[at], offsets[at + count], at)[0]
            assert got == items, (pieces, ranks, chunk, k)


def test_a_bad_line_is_named_by_its_global_number_in_any_range(tmp_path):
    lines = [f"sentence number {i}".encode() for i in range(200)]
    lines[137] = b"bad \xff byte"
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as one:
        textstream.scan(path, spec=open_source(path, Spec()), chunk=16)
    for ranks in (2, 3, 7):
        src = open_source(path, Spec())
        size = path.stat().st_size
        with open(path, "rb") as fh:
            ranges = [br.range_of(fh, size, r, ranks) for r in range(ranks)]
            counts = [br.count_lines(fh, a, b, size)[0] for a, b in ranges]
        errors = []
        for r, (a, b) in enumerate(ranges):
            try:
                br.scan_part(src, size, a, b, sum(counts[:r]), counts[r], 200, 16, ranks)
            except InputError as err:
                errors.append(str(err))
        assert errors == [str(one.value)] and "line 138:" in errors[0]  # the lowest's only


def test_pairs_split_by_ranges_equal_the_whole_scan(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"q {i}\ta {'z' * i}\r\n" for i in range(50)), encoding="utf-8")
    src, _, total, digests, _, _ = split_scan(path, 3, 8, pairs=True)
    assert total == 50 and tuple(digests) == textstream.scan(
        path, pairs=True, spec=src, chunk=8).chunk_digests


# --- the run itself, one rank in this process (MPI.COMM_SELF) -------------------------

TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.ffn=64",
        "input.chunk=8", "input.batch=4"]


def run_once(tmp_path, minilm_dir, text: bytes, change=None, sets=()):
    """A text run through ``encode.run_text``; ``change(path)`` edits the corpus right
    after the pre-flight scan."""
    from mpi4py import MPI

    from mpiattn import config
    from mpiattn.commands import encode
    from mpiattn.parallel import watchdog

    path = tmp_path / "c.txt"
    path.write_bytes(text)
    cfg = config.load(None, [*TINY, f'input.tokenizer="{minilm_dir}/tokenizer.json"',
                             f'input.text="{path}"', *sets])
    scan = encode.scan_corpus

    def scanned(world, source, chunk):
        info = scan(world, source, chunk)
        if change is not None:
            change(path)
        return info

    encode.scan_corpus = scanned
    try:
        return encode.run_text(cfg, watchdog.watch(MPI.COMM_SELF), str(tmp_path / "o.h5"),
                               force=False)
    finally:
        encode.scan_corpus = scan


CORPUS = "".join(f"sentence {i} {'word ' * (i % 7)}\n" for i in range(20)).encode()


def test_a_run_reads_each_byte_range_and_records_it(tmp_path, minilm_dir, capsys):
    import json

    import h5py

    # input.seq_len set: a note (before, the note's variable replaced the corpus: a crash)
    out = run_once(tmp_path, minilm_dir, CORPUS, sets=["input.seq_len=16"])
    assert "input.seq_len is the length of seeded input" in capsys.readouterr().out
    with h5py.File(out) as f:
        lines = [s.strip() for s in CORPUS.decode().split("\n")[:20]]
        assert list(f["input/text"].asstr()[()]) == lines
        scan, read = int(f["work/scan_bytes"][0]), int(f["work/bytes_read"][0])
        # digest pieces, count, check (the scan), then the slices
        assert scan == 3 * len(CORPUS) and read == 4 * len(CORPUS)
        assert f["timings/scan"][0] > 0
        labels = json.loads(f.attrs["input_digests"])
    # the corpus digest: the pieces' SHA-256s (one piece here), the value a resume keys on
    from mpiattn.inputs.byteranges import hash_pieces, piece_digest

    want = piece_digest(hash_pieces(tmp_path / "c.txt", len(CORPUS), range(1)), len(CORPUS))
    assert [v for k, v in labels.items() if k.startswith("input.text")] == [want]


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.write_bytes(CORPUS.replace(b"sentence 9 ", b"sentence X ")),
     "other lines 9-16 (chunk 1) than it had at the start"),
    (lambda p: p.write_bytes(CORPUS + b"one more\n"), "bytes instead of the"),
])
def test_a_corpus_changed_after_the_split_scan_is_caught(tmp_path, minilm_dir, change,
                                                         message):
    with pytest.raises(textstream.InputChanged, match=re.escape(message)):
        run_once(tmp_path, minilm_dir, CORPUS, change)
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob(".o.h5*"))

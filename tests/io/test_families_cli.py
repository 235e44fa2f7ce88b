"""Users' own model folders through the command (#25): ``mpiattn run`` on a RoBERTa folder
with CLS pooling and a Dense layer (no Normalize) writes ``SentenceTransformer.encode``
at 1-3 ranks in head, data and pipeline layouts, and transformers' hidden states with the
tokens split over a sequence group; what is not built is one line, exit 2, on every rank,
and no file; a ModernBERT folder (RoPE, sliding window) in head x pipeline, data, and
ring layouts, and its missing tensor. Twelve launches in all (~30 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from model_folders import build, exact_rope, hidden_states, st_encode

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
needs_mpiexec = pytest.mark.skipif(not Path(MPIEXEC).exists(), reason="mpiexec not found")
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)  # > 24 tokens
LINES = ["A man is playing a guitar.", "", LONG, "naïve café — déjà vu", "The cat sleeps.",
         "Someone plays an acoustic guitar.", "A woman is slicing an onion.", "Hi"]
MODULES = [("Pooling", {"pooling_mode": "cls"}), ("Dense", {"out_features": 5, "seed": 4})]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def run(ranks: int, cwd: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mpiattn", "run", "-o", "out.h5",
           *(arg for s in sets for arg in ("--set", s))]
    cmd = [MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The RoBERTa folder (float64), the text file and sentence-transformers' rows."""
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("cli-models")
    folder = build(root / "roberta", "roberta", "float64", seed=7, modules=MODULES)
    text = root / "lines.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return folder, text, st_encode(folder, LINES)


LAYOUTS = [(1, 1, 1), pytest.param(2, 2, 1, marks=needs_mpiexec),
           pytest.param(3, 1, 1, marks=needs_mpiexec), pytest.param(2, 1, 2, marks=needs_mpiexec)]


@pytest.mark.parametrize(("ranks", "tensor", "pipeline"), LAYOUTS)
def test_text_run_writes_sentence_transformers_encode(tmp_path, model, ranks, tensor,
                                                      pipeline):
    """3 heads on 2 head ranks (2 + 1), 3 data replicas, 2 pipeline stages: /output/pooled
    is ``SentenceTransformer(folder).encode(lines)`` (CLS, Dense 12->5 tanh, not
    normalised), cut at the folder's max_seq_length, the modules recorded."""
    folder, text, want = model
    done = run(ranks, tmp_path, f'model.weights="{folder}"', f'input.text="{text}"',
               'dtype="float64"', f"parallel.tensor={tensor}",
               f"parallel.pipeline={pipeline}", "input.batch=3")
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["output/pooled"][()]
        attrs = dict(f["output/pooled"].attrs)
        assert f.attrs["max_tokens"] == 24 and f.attrs["truncated_lines"] == 1
    assert got.shape == (len(LINES), 5)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-12, err
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # no Normalize listed
    assert attrs["modules"] == "Transformer > Pooling(cls) > Dense(12->5, tanh)"
    assert attrs["modules_source"] == "modules.json"


@needs_mpiexec
def test_roberta_positions_hold_across_a_sequence_group(tmp_path, model):
    """Token input split over 2 sequence ranks (ring) x 1 head rank: each rank's positions
    continue from the slice before it; every token's last hidden state is transformers'."""
    folder = model[0]
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 5000, size=(3, 10))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 6:] = mask[2, 3:] = False
    ids = np.where(mask, ids, 1)  # RoBERTa's pad id
    with h5py.File(tmp_path / "tokens.h5", "w") as f:
        f["input/tokens"] = ids
        f["input/attention_mask"] = mask.astype(np.uint8)
    done = run(2, tmp_path, f'model.weights="{folder}"', 'input.tokens="tokens.h5"',
               'dtype="float64"', "parallel.sequence=2", 'output.layers="last"', "input.seq_len=10",
               'attention.sequence="ring"')
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["layers/01/hidden"][()]
    want = hidden_states(folder, ids, mask)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-12


@needs_mpiexec
@pytest.mark.parametrize("case", ["model_type", "tensor", "pooling"])
def test_what_is_not_built_is_one_line_on_every_rank(tmp_path, model, case):
    """An unknown model_type, a missing tensor, a pooling mode not built: rank 0 prints
    one line, every rank exits 2 (no hang), no output file."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model[0], folder)
    if case == "model_type":
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**hf, "model_type": "deberta-v2"}))
        want = "model_type 'deberta-v2' (RobertaModel) is not supported"
    elif case == "tensor":
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors["encoder.layer.1.output.dense.weight"]
        (folder / "model.safetensors").unlink()
        save_file(tensors, str(folder / "model.safetensors"))
        want = "tensor 'encoder.layer.1.output.dense.weight' is missing"
    else:
        (folder / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode": "sum"}))
        want = "pooling mode 'sum' is not built"
    done = run(2, tmp_path, f'model.weights="{folder}"', f'input.text="{model[1]}"')
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn: error")]
    assert len(lines) == 1 and want in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.h5").exists()


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A ModernBERT folder (float64, mean pooling, 5 heads, window 8 on 24 tokens), the
    text file and sentence-transformers' rows (with the exact RoPE: ``exact_rope``)."""
    pytest.importorskip("sentence_transformers")
    root = tmp_path_factory.mktemp("cli-modernbert")
    folder = build(root / "modernbert", "modernbert", "float64", seed=2,
                   modules=[("Pooling", {"pooling_mode": "mean"})])
    text = root / "lines.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    with exact_rope():
        return folder, text, st_encode(folder, LINES)


@needs_mpiexec
@pytest.mark.parametrize(("ranks", "sets"), [
    (4, ["parallel.tensor=2", "parallel.pipeline=2", 'attention.impl="blocked"',
         "attention.block=5"]),
    (3, ["parallel.tensor=1", "input.batch=3"])])
def test_modernbert_run_writes_sentence_transformers_encode(tmp_path, modernbert, ranks, sets):
    """5 heads on 2 head ranks (3 + 2) x 2 pipeline stages (the final LayerNorm on the
    last) with blocked attention; 3 data replicas: the pooled rows are
    ``SentenceTransformer(folder).encode(lines)`` to 1e-12."""
    folder, text, want = modernbert
    done = run(ranks, tmp_path, f'model.weights="{folder}"', f'input.text="{text}"',
               'dtype="float64"', *sets)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["output/pooled"][()]
        assert f.attrs["max_tokens"] == 24
        assert f["output/pooled"].attrs["modules"] == "Transformer > Pooling(mean)"
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"ModernBERT run at {ranks} ranks {sets}: {err:.1e}")
    assert got.shape == (len(LINES), 20) and err <= 1e-12, err


@needs_mpiexec
def test_modernbert_positions_and_window_hold_across_a_ring(tmp_path, modernbert):
    """Token input (3, 24) split over a ring of 3 sequence ranks (8 + 8 + 8 tokens; the
    window, +-4, never joins the outer slices, whose steps are skipped) with blocked
    attention: every real token's last hidden state is transformers' (exact RoPE)."""
    folder = modernbert[0]
    rng = np.random.default_rng(4)
    ids = rng.integers(1000, 5000, size=(3, 24))
    mask = np.ones(ids.shape, dtype=bool)
    mask[1, 15:] = mask[2, 3:] = False
    ids = np.where(mask, ids, 0)
    with h5py.File(tmp_path / "tokens.h5", "w") as f:
        f["input/tokens"] = ids
        f["input/attention_mask"] = mask.astype(np.uint8)
    done = run(3, tmp_path, f'model.weights="{folder}"', 'input.tokens="tokens.h5"',
               'dtype="float64"', "parallel.sequence=3", 'output.layers="last"',
               "input.seq_len=24", 'attention.sequence="ring"', 'attention.impl="blocked"',
               "attention.block=5")
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["layers/03/hidden"][()]
    with exact_rope():
        want = hidden_states(folder, ids, mask)
    err = np.abs(got - want)[mask].max() / np.abs(want[mask]).max()
    print(f"ModernBERT ring of 3: {err:.1e}")
    assert err <= 1e-12, err


@needs_mpiexec
def test_modernbert_missing_tensor_is_one_line_on_every_rank(tmp_path, modernbert):
    """A ModernBERT folder without one of its tensors: one line from rank 0, exit 2 on
    every rank, no output file."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(modernbert[0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["layers.3.attn.Wo.weight"]
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    done = run(2, tmp_path, f'model.weights="{folder}"', f'input.text="{modernbert[1]}"')
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mpiattn: error")]
    assert len(lines) == 1 and "tensor 'layers.3.attn.Wo.weight' is missing (a ModernBERT" \
        in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out.h5").exists()


@needs_mpiexec
def test_text_run_puts_the_prompt_before_every_line(tmp_path, model):
    """``input.prompt = "query"`` on 2 head ranks, with Pooling include_prompt = false: the
    rows are ``encode(lines, prompt_name="query")`` and the file records the prompt."""
    from model_folders import st_model

    folder = tmp_path / "model"
    shutil.copytree(model[0], folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}}))
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    (folder / "1_Pooling/config.json").write_text(json.dumps({**pooling,
                                                              "include_prompt": False}))
    want = st_model(folder).encode(LINES, batch_size=4, prompt_name="query")
    done = run(2, tmp_path, f'model.weights="{folder}"', f'input.text="{model[1]}"',
               'dtype="float64"', "parallel.tensor=2", 'input.prompt="query"')
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "out.h5") as f:
        got = f["output/pooled"][()]
        attrs = dict(f["output/pooled"].attrs)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-12, err
    assert np.abs(got - model[2]).max() > 1e-3  # the prompt changed every row
    assert (attrs["prompt_name"], attrs["prompt"]) == ("query", "query: ")
    assert attrs["modules"] == ("Transformer > Pooling(cls, prompt excluded)"
                                " > Dense(12->5, tanh)")

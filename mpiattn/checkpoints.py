"""Training checkpoints: whole-model parameters, optimizer state and history in one HDF5
file (Hugging Face names, so any head split resumes from it), written atomically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import h5io
from .config import Config
from .corpus import Corpus
from .errors import InputError
from .hf import to_hf
from .mlm import MLMHead
from .model import Embeddings, LayerShard


def checkpoint_due(step: int, t: Any) -> bool:
    done = step + 1
    return t.checkpoint_every > 0 and (done % t.checkpoint_every == 0 or done == t.steps)


def checkpoint_path(t: Any, done: int) -> Path:
    """train.checkpoint with ``{step}`` replaced by the steps done (one file per checkpoint)."""
    return Path(t.checkpoint.replace("{step}", str(done)))


@dataclass
class History:
    """Per-step records, continued across resumes (stored in checkpoints)."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    tokens_per_second: list = field(default_factory=list)
    eval_step: list = field(default_factory=list)
    eval_loss: list = field(default_factory=list)

    def write(self, g: Any) -> None:
        units = {"loss": "nats", "eval_loss": "nats", "tokens_per_second": "1/s"}
        for name, values in vars(self).items():
            kind = np.int64 if name.endswith("step") else np.float64
            h5io.write_array(g, name, np.asarray(values, dtype=kind), ("step",),
                             **({"units": units[name]} if name in units else {}))

    @classmethod
    def read(cls, g: Any) -> History:
        from .h5safe import read

        return cls(**{f.name: list(read(g[f.name])) for f in dataclasses.fields(cls)})


def write_checkpoint(path: Any, cfg: Config, done: int, params: dict[str, Any],
                     state: dict[str, dict[str, Any]], corpus: Corpus, history: History,
                     tensor: int) -> None:
    """Whole-model parameters and optimizer state (HF naming), written atomically to
    ``path`` (a file name, refused if it exists, or an ``outfile.Reservation``)."""
    with h5io.atomic_file(path) as f:
        f.attrs.update({"format_version": h5io.FORMAT_VERSION, "command": "train checkpoint",
                        "step": done, "optimizer": cfg.train.optimizer, "seed": cfg.seed,
                        "config": cfg.to_toml(), "tensor_parallel": tensor,
                        "data_position": done * cfg.input.batch,
                        "rng": "stateless: batches and masks are seeded by (seed, step)"})
        g = f.create_group("params")
        for name, a in params.items():
            h5io.write_array(g, name, a)
        for kind, tensors in state.items():
            s = f.create_group(f"optimizer/{kind}")
            for name, a in tensors.items():
                h5io.write_array(s, name, a)
        h5io.write_array(f.create_group("vocab"), "token_ids", corpus.token_ids,
                         description="tokenizer id of each model id")
        history.write(f.create_group("train"))
        f.attrs["status"] = "complete"


@dataclass
class Checkpoint:
    step: int
    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]]
    token_ids: np.ndarray
    history: History
    optimizer: str


def read_checkpoint(path: str | Path, cfg: Config) -> Checkpoint:
    """A checkpoint someone handed us: only what is inside the file (``h5safe``), every
    dataset's declared size checked before it is read, any malformed part one line."""
    from . import h5safe

    with h5io.open_for_reading(path) as f:
        if h5safe.attr(f, "status") != "complete" or "params" not in f:
            raise InputError(f"'{path}' is not a complete mpiattn training checkpoint")
        try:
            params = {k: h5safe.read(f["params"][k]) for k in f["params"]}
            state = {kind: {k: h5safe.read(g[k]) for k in g}
                     for kind, g in f.get("optimizer", {}).items()}
            ck = Checkpoint(int(h5safe.attr(f, "step")), params, state,
                            h5safe.read(f["vocab/token_ids"]), History.read(f["train"]),
                            h5safe.text(h5safe.attr(f, "optimizer"), "optimizer"))
        except h5safe.MALFORMED as err:
            raise InputError(f"'{path}' is not a readable mpiattn training checkpoint:"
                             f" {h5safe.one_line(err)}") from None
    if ck.optimizer != cfg.train.optimizer:
        raise InputError(f"'{path}' holds {ck.optimizer} state but train.optimizer ="
                         f" {cfg.train.optimizer}: set train.optimizer={ck.optimizer}")
    if ck.step >= cfg.train.steps:
        raise InputError(f"'{path}' is at step {ck.step}, train.steps = {cfg.train.steps}:"
                         " raise train.steps to continue")
    return ck


def expected_shapes(cfg: Config, vocab: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the whole-model tensors in HF naming (as ``to_hf`` writes them)."""
    m, h = cfg.model, cfg.model.hidden
    z = np.zeros
    layer = LayerShard(z((h, 3 * h)), z(3 * h), z((h, h)), z(h), z(h), z(h), z((h, m.ffn)),
                       z(m.ffn), z((m.ffn, h)), z(h), z(h), z(h), h // m.heads)
    emb = Embeddings(z((vocab, h)), z((m.max_positions, h)), z((m.type_vocab, h)), z(h), z(h))
    head = MLMHead(z((h, h)), z(h), z(h), z(h), z(vocab))
    return {k: a.shape for k, a in to_hf(emb, [layer] * m.layers, head).items()}


def check_shapes(path: str, ck: Checkpoint, want: dict[str, tuple[int, ...]]) -> None:
    for name, shape in want.items():
        got = ck.params.get(name)
        if got is None or got.shape != shape:
            have = None if got is None else got.shape
            raise InputError(f"'{path}': {name} has shape {have}, this model needs {shape}"
                             " (the config's model.* must match the checkpoint's)")


def latest_checkpoint(t: Any) -> Path | None:
    """``--resume auto``: the newest complete checkpoint of ``train.checkpoint`` (any
    ``{step}``), or None when there is none yet (a first run starts from scratch)."""
    import h5py

    pattern = Path(t.checkpoint.replace("{step}", "*"))
    best: tuple[int, Path] | None = None
    for path in pattern.parent.glob(pattern.name):
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("status") != "complete" or "step" not in f.attrs:
                    continue
                step = int(f.attrs["step"])
        except (OSError, ValueError, TypeError):
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return None if best is None else best[1]

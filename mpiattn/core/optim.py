"""Optimizers (SGD with momentum, Adam, AdamW), the learning-rate schedule and global-norm
clipping, on lists of NumPy/CuPy arrays updated in place. MPI-free.

Parameters and their state are lists in the order of ``mlm.named``; each rank updates
only what it holds (its shard of the sharded tensors, a full copy of the replicated ones),
so the state is sharded exactly like the parameters.

Weight decay touches matrices and embedding tables only (ndim >= 2), not biases or
LayerNorm gains, as BERT and nanoGPT do. AdamW decays decoupled (``p -= lr * wd * p``);
SGD and Adam add ``wd * p`` to the gradient (L2), as ``train.weight_decay`` documents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import TrainConfig
from .backend import get_array_module, to_host

STATE = {"sgd": ("momentum",), "adam": ("m", "v"), "adamw": ("m", "v")}


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up from lr/warmup to
    lr over ``warmup`` steps, then cosine or linear decay to ``min_lr`` at the last step."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.decay == "none":
        return t.lr
    span = max(1, t.steps - 1 - t.warmup)
    progress = min(1.0, (step - t.warmup) / span)
    if t.decay == "cosine":
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))
    return t.lr - (t.lr - t.min_lr) * progress


def squared_norms(grads: Sequence[Any], sharded: Sequence[bool]) -> tuple[float, float]:
    """(sum of squares of the sharded gradients, of the replicated ones) on this rank.

    Each tensor's sum of squares is added in float64 in list order; on a device the two
    totals are formed there and read back in one copy (not one blocking read a tensor),
    with the same float64 additions in the same order, so the same bits as on the host."""
    xp = get_array_module(grads[0]) if len(grads) else np
    if xp is not np:
        totals = [xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.float64)]
        for g, s in zip(grads, sharded, strict=True):
            flat = g.reshape(-1)
            totals[0 if s else 1] = totals[0 if s else 1] + xp.vdot(flat, flat).real.astype(
                xp.float64)
        both = to_host(xp.stack(totals))
        return float(both[0]), float(both[1])
    parts = [0.0, 0.0]
    for g, s in zip(grads, sharded, strict=True):
        parts[0 if s else 1] += float(xp.vdot(g.reshape(-1), g.reshape(-1)).real)
    return parts[0], parts[1]


def global_norm(grads: Sequence[Any], sharded: Sequence[bool],
                sum_heads: Callable[[float], float]) -> float:
    """The norm of the whole model's gradient: sharded tensors' squares summed over the
    head group (``sum_heads``), replicated tensors counted once (every rank has them)."""
    s, r = squared_norms(grads, sharded)
    return math.sqrt(sum_heads(s) + r)


def clip_factor(norm: float, clip: float) -> float:
    """Scale applied to every gradient: min(1, clip / norm); 1 when clipping is off."""
    if clip <= 0 or not math.isfinite(norm) or norm <= clip:
        return 1.0
    return clip / (norm + 1e-6)


class Optimizer:
    """One of ``sgd``, ``adam``, ``adamw`` over a fixed list of parameters."""

    def __init__(self, t: TrainConfig, params: Sequence[Any],
                 decays: Sequence[bool] | None = None) -> None:
        """``decays``: which parameters weight decay touches (default: ndim >= 2; given
        when ``params`` are flat pieces of tensors, as a ZeRO-1 shard's are)."""
        self.t = t
        self.kind = t.optimizer
        self.names = STATE[self.kind]
        self.state: dict[str, list[Any]] = {
            n: [get_array_module(p).zeros_like(p) for p in params] for n in self.names}
        self.decays = [p.ndim >= 2 for p in params] if decays is None else list(decays)

    def step(self, params: Sequence[Any], grads: Sequence[Any], lr: float, step: int,
             scale: float = 1.0) -> None:
        """Update ``params`` in place with ``scale * grads`` (the clip factor); ``step`` is
        0-based (Adam's bias correction uses step + 1)."""
        t = self.t
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g * scale if scale != 1.0 else g.copy()
            wd = t.weight_decay if self.decays[i] else 0.0
            if self.kind == "sgd":
                if wd:
                    g += wd * p
                buf = self.state["momentum"][i]
                buf *= t.momentum
                buf += g
                p -= lr * buf
                continue
            if self.kind == "adam" and wd:
                g += wd * p
            if self.kind == "adamw" and wd:
                p *= 1.0 - lr * wd
            m, v = self.state["m"][i], self.state["v"][i]
            m *= t.beta1
            m += (1.0 - t.beta1) * g
            v *= t.beta2
            v += (1.0 - t.beta2) * (g * g)
            c1 = 1.0 - t.beta1 ** (step + 1)
            c2 = 1.0 - t.beta2 ** (step + 1)
            xp = get_array_module(p)
            p -= (lr / c1) * m / (xp.sqrt(v / c2) + t.eps)

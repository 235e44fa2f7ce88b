"""The replicated share of a training step: FLOPs that every rank of a head group repeats.

A training step (``mpiattn train``, one replica of ``batch`` sequences of ``seq`` tokens,
``masked = mask_prob * batch * seq`` masked tokens) on a head group of T ranks, counted as
forward + backward = 3 x forward for every product (backward: dL/dx and dL/dW):

- split by heads (each rank 1/T): per layer ``2 N H 3H + 2 N H H + 4 N H F`` (QKV, output,
  MLP) and ``4 B S^2 H`` (scores and weighted sum), times 3;
- the tied decoder over the vocabulary ``3 x 2 masked H V`` and the softmax over it
  (``SOFTMAX_FLOPS`` per logit): split by words (1/T) with ``parallel.vocab``, else
  repeated on every rank;
- repeated on every rank: the MLM head's transform ``3 x 2 masked H^2``, the element-wise
  work between the reductions (LayerNorms, residuals, biases: ``ELEMENTWISE_FLOPS`` per
  token and hidden unit per layer, ``EMBED_FLOPS`` for the embeddings), and the optimizer
  (``OPTIMIZER_FLOPS`` per parameter) on the replicated parameters (biases after a
  reduction, LayerNorms, position and type tables, the head; and the word table and
  decoder bias unless ``parallel.vocab``).

The element-wise constants are counts of the operations in ``core.ops`` (a LayerNorm's
forward ~8 per element and its backward ~16, two per layer; residual and bias adds and
their gradients), not measurements; they make a few tenths of a percent at BERT shapes.
"""

from __future__ import annotations

from typing import Any

ELEMENTWISE_FLOPS = 56  # per token x hidden unit x layer, forward + backward (replicated)
EMBED_FLOPS = 28  # per token x hidden unit: the sum of three rows and a LayerNorm, fwd + bwd
SOFTMAX_FLOPS = 6  # per logit: max, exp, sum, divide; its gradient
OPTIMIZER_FLOPS = 15  # per parameter and step (AdamW: moments, bias corrections, update)


def step_flops(*, layers: int, heads: int, hidden: int, ffn: int, vocab: int, batch: int,
               seq: int, mask_prob: float, tensor: int, vocab_split: bool,
               max_positions: int = 512, type_vocab: int = 2) -> dict[str, Any]:
    """FLOPs of one training step on one rank of a head group of ``tensor`` ranks:
    ``{"sharded": .., "replicated": .., "per_rank": .., "replicated_share": ..}`` (the
    share = replicated / per_rank; FLOPs per step, the replica's ``batch`` sequences)."""
    n, h, f = batch * seq, hidden, ffn
    masked = mask_prob * n
    layer = 2 * n * h * 3 * h + 2 * n * h * h + 4 * n * h * f + 4 * batch * seq * seq * h
    sharded = 3.0 * layers * layer / tensor
    decoder = 3.0 * 2 * masked * h * vocab + SOFTMAX_FLOPS * masked * vocab
    rows = vocab * h + vocab  # the word table and the decoder bias
    small = (layers * 6 * h + (max_positions + type_vocab + 2) * h  # biases, norms, tables
             + h * h + 3 * h)  # the head's transform
    replicated = (3.0 * 2 * masked * h * h + ELEMENTWISE_FLOPS * n * h * layers
                  + EMBED_FLOPS * n * h + OPTIMIZER_FLOPS * small)
    if vocab_split and tensor > 1:
        sharded += (decoder + OPTIMIZER_FLOPS * rows) / tensor
    else:
        replicated += decoder + OPTIMIZER_FLOPS * rows
    total = sharded + replicated
    return {"sharded": sharded, "replicated": replicated, "per_rank": total,
            "replicated_share": replicated / total}


def format_share(shape: dict[str, Any], tensor: int = 2) -> str:
    """One line for ``plan``: the replicated share at ``tensor`` head ranks, with the
    vocabulary split (``parallel.vocab``, the default) and without."""
    on = step_flops(**shape, tensor=tensor, vocab_split=True)
    off = step_flops(**shape, tensor=tensor, vocab_split=False)
    return (f"training step at tensor {tensor}: {on['per_rank'] / 1e9:.1f} GFLOP per rank,"
            f" replicated share {100 * on['replicated_share']:.1f}% with the vocabulary split"
            f" (parallel.vocab), {100 * off['replicated_share']:.1f}% with the whole"
            f" vocabulary on every rank")

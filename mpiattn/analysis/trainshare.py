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

With pipeline stages a stage counts its own layers, the embeddings (stage 0) and the
head and decoder (the last stage); with sequence slices each rank its slice's tokens.

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
               max_positions: int = 512, type_vocab: int = 2, pipeline: int = 1,
               stage: int | None = None, sequence: int = 1) -> dict[str, Any]:
    """FLOPs of one training step on one rank of a head group of ``tensor`` ranks:
    ``{"sharded": .., "replicated": .., "per_rank": .., "replicated_share": ..}`` (the
    share = replicated / per_rank; FLOPs per step, the replica's ``batch`` sequences).

    ``pipeline`` stages (``stage``: which, default the last, which holds the MLM head and
    the decoder): the stage's layers (``pipeline.stage_layers``); the embeddings on stage
    0; the head, the decoder and a copy of the tied word table on the last stage (its
    optimizer runs on both ends). ``sequence`` slices: each rank computes the layers,
    the element-wise work and the loss of its ``seq / sequence`` tokens (attention: its
    queries against every key) and runs the optimizer on every parameter it holds (the
    optimizer's FLOPs do not shrink with the slices). The vocabulary split divides the
    decoder, its softmax and the word rows' optimizer by ``tensor`` at every layout.
    """
    from ..core.pipeline import stage_layers

    stage = pipeline - 1 if stage is None else stage
    first, last = stage == 0, stage == pipeline - 1
    count = len(stage_layers(layers, pipeline, stage))
    n, h, f = batch * seq / sequence, hidden, ffn  # this rank's tokens
    masked = mask_prob * n
    layer = (2 * n * h * 3 * h + 2 * n * h * h + 4 * n * h * f
             + 4 * batch * (seq / sequence) * seq * h)
    sharded = 3.0 * count * layer / tensor
    small = count * 6 * h  # the stage's layers' replicated biases and norms
    replicated = ELEMENTWISE_FLOPS * n * h * count
    rows = 0.0  # word-table and decoder-bias parameters the optimizer updates here
    vocab_work = 0.0  # the tied decoder and its softmax
    if first:
        small += (max_positions + type_vocab + 2) * h  # position, type tables, LayerNorm
        replicated += EMBED_FLOPS * n * h
        rows += vocab * h
    if last:
        small += h * h + 3 * h  # the head's transform
        replicated += 3.0 * 2 * masked * h * h
        rows += vocab + (0 if first else vocab * h)  # the bias; the tied copy
        vocab_work = 3.0 * 2 * masked * h * vocab + SOFTMAX_FLOPS * masked * vocab
    replicated += OPTIMIZER_FLOPS * small
    if vocab_split and tensor > 1:
        sharded += (vocab_work + OPTIMIZER_FLOPS * rows) / tensor
    else:
        replicated += vocab_work + OPTIMIZER_FLOPS * rows
    total = sharded + replicated
    return {"sharded": sharded, "replicated": replicated, "per_rank": total,
            "replicated_share": replicated / total}


LAYOUTS = (  # (label, JSON key, step_flops keywords) printed beside tensor 2 alone
    ("tensor 2 x pipeline 2, first stage", "tensor2_pipeline2_first_stage",
     {"pipeline": 2, "stage": 0}),
    ("tensor 2 x pipeline 2, last stage", "tensor2_pipeline2_last_stage",
     {"pipeline": 2, "stage": 1}),
    ("tensor 2 x sequence 2", "tensor2_sequence2", {"sequence": 2}),
)


def layout_shares(shape: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``step_flops`` with the vocabulary split at each of ``LAYOUTS`` that the model's
    layers allow, by JSON key (``plan --json``)."""
    return {key: step_flops(**shape, tensor=2, vocab_split=True, **extra)
            for _, key, extra in LAYOUTS if extra.get("pipeline", 1) <= int(shape["layers"])}


def format_share(shape: dict[str, Any], tensor: int = 2) -> str:
    """Lines for ``plan``: the replicated share at ``tensor`` head ranks, with the
    vocabulary split (``parallel.vocab``, the default) and without; then at tensor 2 with
    pipeline stages (each end) and sequence slices (``LAYOUTS``), where the vocabulary is
    split too."""
    on = step_flops(**shape, tensor=tensor, vocab_split=True)
    off = step_flops(**shape, tensor=tensor, vocab_split=False)
    lines = [f"training step at tensor {tensor}: {on['per_rank'] / 1e9:.1f} GFLOP per rank,"
             f" replicated share {100 * on['replicated_share']:.1f}% with the vocabulary"
             f" split (parallel.vocab), {100 * off['replicated_share']:.1f}% with the whole"
             f" vocabulary on every rank"]
    layers = int(shape["layers"])
    for label, _, extra in LAYOUTS:
        if extra.get("pipeline", 1) > layers:
            continue
        on = step_flops(**shape, tensor=2, vocab_split=True, **extra)
        off = step_flops(**shape, tensor=2, vocab_split=False, **extra)
        lines.append(f"{label}: {on['per_rank'] / 1e9:.1f} GFLOP per rank, replicated share"
                     f" {100 * on['replicated_share']:.1f}% split,"
                     f" {100 * off['replicated_share']:.1f}% whole")
    return "\n  ".join(lines)

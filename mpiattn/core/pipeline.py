"""Pipeline parallelism of the forward pass: stages of consecutive layers, micro-batches
moved stage to stage by checked point-to-point messages (GPipe's fill and drain).

    for each micro-batch m (in order):
        stage 0:      embed, its layers, send to stage 1
        stage s:      receive from stage s-1, its layers, send to stage s+1
        last stage:   receive, its layers, keep the result

Layers split like heads (``shard.partition``): 12 layers on 5 stages are 3,3,2,2,2. Every
rank of a stage's head group holds the same activations after its Allreduces, so head
rank t of stage s sends to head rank t of stage s+1 over the pipeline communicator: no
extra gather. Each message carries a digest checked on receipt (``transfers.CheckedP2P``,
site ``activations``): a flipped bit is caught, the message resent, the output equal to a
clean run. The time a stage waits for its input is the ``bubble`` phase: ideally
(P-1)/(M+P-1) of the forward (Huang et al., GPipe, 2019; Megatron-LM's schedules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .attention import KeyMask, Options
from .backend import get_array_module
from .model import LayerShard, Phase, Reduce, layer_forward, no_timing, with_relative_bias
from .ops import embed
from .shard import partition

SITE = "activations"  # fault.inject site of the messages between stages
PHASES = ("p2p", "bubble")  # timed phases a stage adds: sending, waiting for its input


def stage_layers(layers: int, stages: int, stage: int) -> range:
    """The layers of pipeline stage ``stage`` (consecutive; earlier stages take the
    remainder)."""
    count, start = partition(layers, stages, stage)
    return range(start, start + count)


def micro_batches(batch: int, count: int) -> list[slice]:
    """Row slices of ``count`` micro-batches (at most one per sequence)."""
    count = max(1, min(count, batch))
    spans = [partition(batch, count, m) for m in range(count)]
    return [slice(start, start + n) for n, start in spans]


BWD_SITE = "activations.bwd"  # fault.inject site of the gradients sent back (training)


def one_f_one_b(stages: int, stage: int, micro: int) -> list[tuple[str, int]]:
    """The order of forwards ("F", m) and backwards ("B", m) of micro-batches 0..micro-1 on
    pipeline stage ``stage`` of ``stages``: 1F1B, PipeDream-Flush (Narayanan et al.,
    "Memory-Efficient Pipeline-Parallel DNN Training", 2021) as Megatron-LM's
    non-interleaved schedule (``forward_backward_pipelining_without_interleaving``):
    a warm-up of min(stages - stage - 1, micro) forwards, then one forward and one
    backward alternately, then the remaining backwards. At most stages - stage
    micro-batches' activations are held at once (GPipe holds all ``micro``).
    """
    warm = min(stages - stage - 1, micro)
    order = [("F", m) for m in range(warm)]
    for k in range(micro - warm):
        order += [("F", warm + k), ("B", k)]
    order += [("B", m) for m in range(micro - warm, micro)]
    return order


def stage_events(stages: int, stage: int, micro: int,
                 backward: bool = True) -> list[tuple[str, str, int]]:
    """What stage ``stage`` does, in order: ("recv" | "run" | "send", "F" | "B", m).

    The order of ``one_f_one_b`` (forwards only without ``backward``) with its messages:
    a forward receives its input from the previous stage and sends its output to the
    next; a backward receives dL/d output from the next and sends dL/d input to the
    previous. A warm-up forward's output is sent at once; a steady-state forward's after
    the gradient of the backward that follows it has arrived: Megatron-LM's
    ``send_forward_recv_backward`` as a receive, then a send, matched by the next stage's
    ``send_backward_recv_forward`` (a send, then a receive), so blocking messages never
    wait on each other in a cycle (``tests/core/test_pipeline_schedule.py`` simulates it).
    """
    first, last = stage == 0, stage == stages - 1
    order = (one_f_one_b(stages, stage, micro) if backward
             else [("F", m) for m in range(micro)])
    warm = min(stages - stage - 1, micro)
    events: list[tuple[str, str, int]] = []
    deferred: list[int] = []
    for op, m in order:
        if op == "F":
            events += [] if first else [("recv", "F", m)]
            events.append(("run", "F", m))
            if not last and backward and m >= warm:
                deferred.append(m)
            elif not last:
                events.append(("send", "F", m))
            continue
        events += [] if last else [("recv", "B", m)]
        events += [("send", "F", d) for d in deferred]
        deferred.clear()
        events.append(("run", "B", m))
        events += [] if first else [("send", "B", m)]
    return events


def stage_forward(ids: Any, key_mask: Any, types: Any, emb: Any, layers: dict[int, LayerShard],
                  reduce: Reduce, eps: float, stage: int, stages: int, p2p: Any,
                  microbatches: int, phase: Phase = no_timing,
                  on_layer: Callable[[int, slice, Any, Any], None] | None = None,
                  options: Options | None = None, chunks: int = 1,
                  stats: Any = None) -> list[tuple[slice, Any]]:
    """This stage's share of the forward of the whole (B, S) batch.

    ``layers``: index -> this rank's shard of the stage's layers. ``p2p``: a
    ``CheckedP2P`` over the pipeline communicator (rank = stage). ``on_layer(i, rows,
    attention, hidden)`` sees each layer's outputs of each micro-batch; ``stats``: a
    ``headstats.HeadStats`` for this rank's heads of the stage's layers, or None. Returns,
    on the last stage, (rows, last hidden (b, S, H)) per micro-batch; elsewhere an empty
    list.
    """
    xp = get_array_module(ids)
    order = sorted(layers)
    hidden = layers[order[0]].w_o.shape[1]
    seq = ids.shape[1]
    options = with_relative_bias(options, emb, seq)
    finals = []
    for m, rows in enumerate(micro_batches(ids.shape[0], microbatches)):
        count = rows.stop - rows.start
        if stage == 0:
            x = embed(ids[rows], emb, eps, None if types is None else types[rows],
                      0 if options is None or options.sequence is None
                      else options.sequence.split.start, key_mask[rows])
        else:
            # on the device: the checked p2p stages it (or not, with CUDA-aware MPI)
            x = xp.empty((count, seq, hidden), dtype=layers[order[0]].w_o.dtype)
            with phase("bubble"):  # waiting for the previous stage is the pipeline's idle time
                p2p.recv(x, stage - 1, site=SITE, layer=order[0] - 1, tag=m)
        mask = KeyMask.from_mask(key_mask[rows])
        for i in order:
            if hasattr(phase, "layer"):
                phase.layer = i
            attn, x = layer_forward(x, layers[i], mask, reduce, i, eps, phase, options, chunks,
                                    None if stats is None else stats.at(i, rows.start))
            if on_layer is not None:
                on_layer(i, rows, attn, x)
        if stage < stages - 1:
            with phase("p2p"):
                p2p.send(x, stage + 1, site=SITE, layer=order[-1], tag=m)
        else:
            finals.append((rows, x))
    return finals

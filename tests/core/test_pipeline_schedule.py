"""The 1F1B pipeline schedule (serial): the published order, and its messages never
deadlock when every send blocks until its receive (``CheckedP2P`` waits for a verdict)."""

import pytest

from mpiattn.core.pipeline import one_f_one_b, stage_events

# PipeDream-Flush / Megatron-LM non-interleaved 1F1B, 4 stages, 8 micro-batches (Narayanan
# et al., SC'21, Figure 4 top, numbered from 0 here)
PUBLISHED = {
    0: "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
    1: "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
    2: "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
    3: "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
}


def spoken(order):
    return " ".join(f"{op}{m}" for op, m in order)


@pytest.mark.parametrize("stage", range(4))
def test_published_order(stage):
    assert spoken(one_f_one_b(4, stage, 8)) == PUBLISHED[stage]


@pytest.mark.parametrize("stages", range(1, 7))
@pytest.mark.parametrize("micro", range(1, 10))
def test_every_micro_batch_once_and_bounded_memory(stages, micro):
    for stage in range(stages):
        order = one_f_one_b(stages, stage, micro)
        assert sorted(order) == sorted([("F", m) for m in range(micro)]
                                       + [("B", m) for m in range(micro)])
        held = peak = 0
        done = set()
        for op, m in order:
            if op == "B":
                assert ("F", m) in done  # forward before backward
            held += 1 if op == "F" else -1
            peak = max(peak, held)
            done.add((op, m))
        assert peak == min(stages - stage, micro)  # 1F1B: at most P - s in flight
        warm = min(stages - stage - 1, micro)
        assert [op for op, _ in order[:warm]] == ["F"] * warm


def simulate(stages, micro, backward):
    """Run every stage's events with rendezvous sends; the events each stage completed."""
    events = [stage_events(stages, s, micro, backward) for s in range(stages)]
    at = [0] * stages
    ran = [[] for _ in range(stages)]
    while True:
        moved = False
        for s in range(stages):
            while at[s] < len(events[s]) and events[s][at[s]][0] == "run":
                ran[s].append(events[s][at[s]][1:])
                at[s] += 1
                moved = True
            if at[s] == len(events[s]):
                continue
            kind, op, m = events[s][at[s]]
            if kind != "send":
                continue
            peer = s + 1 if op == "F" else s - 1
            if at[peer] < len(events[peer]) and events[peer][at[peer]] == ("recv", op, m):
                at[s] += 1
                at[peer] += 1
                moved = True
        if not moved:
            return at, events, ran


@pytest.mark.parametrize("stages", range(1, 7))
@pytest.mark.parametrize("micro", range(1, 10))
@pytest.mark.parametrize("backward", [True, False])
def test_messages_never_deadlock(stages, micro, backward):
    at, events, ran = simulate(stages, micro, backward)
    assert at == [len(e) for e in events]  # every stage finished
    for s in range(stages):
        expect = one_f_one_b(stages, s, micro) if backward else [("F", m) for m in range(micro)]
        assert ran[s] == expect

"""``mpiattn plan``: the fits recover known machine parameters from synthetic files and
read real runs; the accuracy on real runs is a benchmark (``jobs/bench/plan_accuracy.py``),
not a test, since it depends on the machine's load."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpiattn.analysis import plan, report
from mpiattn.commands.cli import main
from mpiattn.core.shard import counts

PHASES = ["qkv", "attention", "out_proj", "allreduce", "norm", "mlp"]
JOB = plan.Job(layers=3, heads=12, hidden=96, ffn=384, batch=4, seq_len=32)
TRUE = {"rate": 2e10, "g": 3e-9, "h": 5e-10, "alpha": 2e-5, "beta": 1e-9}
CORES = 4


def config_toml(job: plan.Job) -> str:
    return (f'dtype = "{job.dtype}"\n[model]\nlayers = {job.layers}\nheads = {job.heads}\n'
            f"hidden = {job.hidden}\nffn = {job.ffn}\n[input]\nbatch = {job.batch}\n"
            f'seq_len = {job.seq_len}\n[checksum]\nmode = "abft"\nwire = "float64"\n')


def synthetic_run(path: Path, n: int, job: plan.Job = JOB) -> Path:
    """A run file whose phase times follow the plan's model exactly (p = 1, CORES cores)."""
    k = plan.threads_for(CORES, n)
    sp = plan.speed(CORES, n, k, 1.0)
    share = plan.speed(CORES, n, k, 0.0)
    heads = counts(job.heads, n)
    nbytes = job.wire_bytes()
    sec = np.zeros((n, job.layers, 6))
    for r in range(n):
        sharded = plan.rank_flops(job, heads[r], job.batch) / TRUE["rate"] / sp
        sec[r, :, :3] = sharded / 6
        sec[r, :, 5] = sharded / 2
        sec[r, :, 4] = TRUE["g"] * job.tokens() * job.hidden / share
        sec[r, :, 3] = 2 * (TRUE["h"] * nbytes / sp
                            + plan.ring(n, nbytes, TRUE["alpha"], TRUE["beta"]))
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": 1, "command": "run", "config": config_toml(job),
                        "world_size": n, "tensor_parallel": n, "data_parallel": 1,
                        "head_partition": np.array(heads), "blas_threads_per_rank": k})
        f.create_dataset("timings/seconds", data=sec).attrs["phases"] = PHASES
        f["timings/forward"] = sec.sum(axis=(1, 2)).max() + np.zeros(n)
        f["ranks/host"] = ["synthetic-node"] * n
    return path


def test_fit_recovers_known_parameters(tmp_path):
    files = [report.load(synthetic_run(tmp_path / f"s{n}.h5", n)) for n in (1, 2, 4)]
    f = plan.fit(files, CORES)
    assert f.p == pytest.approx(1.0)
    assert f.rate == pytest.approx(TRUE["rate"], rel=1e-6)
    assert f.g == pytest.approx(TRUE["g"], rel=1e-6)
    for key in ("h", "alpha", "beta"):
        assert getattr(f, key) == pytest.approx(TRUE[key], rel=1e-6), key
    for c in plan.check(files, f):
        assert abs(c["layer_error"]) < 1e-6 and abs(c["forward_error"]) < 1e-6


def test_bench_files(tmp_path):
    """Allreduce alpha-beta from a bench size sweep at 2 and 4 ranks; rate from the GEMMs."""
    paths = []
    for n in (2, 4):
        nbytes = np.array([8.0, 4096, 65536, 1 << 20])
        seconds = np.array([plan.ring(n, b, TRUE["alpha"], TRUE["beta"]) for b in nbytes])
        path = tmp_path / f"b{n}.h5"
        with h5py.File(path, "w") as f:
            f.attrs.update({"format_version": 1, "command": "bench", "config": config_toml(JOB),
                            "world_size": n, "tensor_parallel": n, "blas_threads_per_rank": 1})
            f["bench/allreduce/bytes"] = nbytes
            f["bench/allreduce/seconds"] = seconds
            f["bench/allreduce"].attrs["ranks"] = n
            f["bench/gemm/flops_per_second"] = np.full(n, 3e10)
            f["ranks/host"] = ["synthetic-node"] * n
        paths.append(path)
    f = plan.fit([report.load(p) for p in paths], CORES)
    assert f.alpha == pytest.approx(TRUE["alpha"], rel=1e-6)
    assert f.beta == pytest.approx(TRUE["beta"], rel=1e-6)
    assert f.rate == pytest.approx(3e10)
    assert any("GEMM peak" in note for note in f.notes)


def test_layouts_nodes_and_impossible_counts(tmp_path):
    files = [report.load(synthetic_run(tmp_path / f"s{n}.h5", n)) for n in (1, 2, 4)]
    f = plan.fit(files, CORES)
    rows = plan.table(JOB, f, plan.Target(CORES, None, f.alpha, f.beta), [1, 8, 12, 48, 49])
    by = {r["ranks"]: r for r in rows}
    assert (by[8]["data"], by[8]["tensor"]) == (1, 8)  # uneven heads: 2,2,2,2,1,1,1,1
    assert by[8]["heads_per_rank"] == 2
    assert (by[12]["data"], by[12]["tensor"]) == (1, 12)
    assert (by[48]["data"], by[48]["tensor"]) == (4, 12)  # heads x batch: the most
    assert "impossible" in by[49]
    # 4 ranks per node: a 12-rank head group spans nodes and pays the inter-node rates
    slow = plan.Target(CORES, 4, 1e-3, 1e-8)
    fast = plan.Target(CORES, 4, f.alpha, f.beta)
    a = plan.predict(JOB, f, slow, 12)
    b = plan.predict(JOB, f, fast, 12)
    assert a["inter_node"] and a["nodes"] == 3
    assert a["allreduce_s"] > b["allreduce_s"] + 2 * 22 * 1e-3 * 0.99


def test_cli_table_to_1024_with_assumptions(tmp_path, capsys):
    paths = [str(synthetic_run(tmp_path / f"s{n}.h5", n)) for n in (1, 2, 4)]
    assert main(["plan", *paths, "--measured-cores", str(CORES), "--set", "model.heads=32",
                 "--set", "input.batch=32"]) == 0
    out = capsys.readouterr().out
    assert "assumptions:" in out and "ring" in out and "-- needs" not in out
    assert any(line.split()[:1] == ["1024"] for line in out.splitlines())
    assert main(["plan", *paths, "--json", "--ranks", "1,2,4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["ranks"] for r in data["predictions"]] == [1, 2, 4]
    assert main(["plan", *paths, "--set", "model.nope=3"]) == 2


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec")
def test_checks_real_runs(tmp_path):
    """Real runs at 1 and 2 ranks are read, fitted and checked: one row per run with a
    prediction for its own layout. How close the prediction comes depends on the machine's
    load, so it is measured by ``jobs/bench/plan_accuracy.py``, never asserted here."""
    small = ["--set", "model.layers=2", "--set", "model.hidden=64", "--set", "model.ffn=128",
             "--set", "model.heads=4", "--set", "model.vocab=100", "--set", "input.batch=2",
             "--set", "input.seq_len=16"]
    paths = []
    for n in (1, 2):
        out = tmp_path / f"r{n}.h5"
        done = subprocess.run(["mpiexec", "-n", str(n), sys.executable, "-m", "mpiattn", "run",
                               *small, "-o", str(out)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        paths.append(out)
    files = plan.fastest([report.load(p) for p in paths])
    checks = plan.check(files, plan.fit(files))
    assert sorted(c["ranks"] for c in checks) == [1, 2]
    for c in checks:
        assert c["measured_layer_s"] > 0 and c["predicted_layer_s"] > 0
        assert np.isfinite(c["layer_error"]) and np.isfinite(c["forward_error"])


def test_pipeline_bubble_follows_gpipe():
    """Stage time x (M+P-1)/M: the bubble (P-1)/(M+P-1), no messages at alpha = beta = 0."""
    f = plan.Fit(cores=4, rate=2e10, g=3e-9, p=0.9, h=5e-10, alpha=0.0, beta=0.0)
    tgt = plan.Target(4, None, 0.0, 0.0)
    for stages in (2, 3, 4):
        for micro in (1, 2, 8):
            job = plan.Job(layers=12, heads=12, hidden=96, ffn=384, batch=8, seq_len=32,
                           microbatches=micro)
            r = plan.predict_layout(job, f, tgt, 1, 1, stages)
            assert r["microbatches"] == micro
            assert r["bubble_fraction"] == pytest.approx((stages - 1) / (micro + stages - 1))
            assert r["p2p_s"] == 0.0
            layer = r["compute_s"] + r["allreduce_s"]
            want = -(-12 // stages) * layer * (micro + stages - 1) / micro
            assert r["forward_s"] == pytest.approx(want)
    # messages: (M+P-2) of ceil(B/M) x S x H x itemsize bytes at alpha + bytes beta
    f2 = dataclasses.replace(f, alpha=1e-5, beta=1e-9)
    job = plan.Job(layers=12, heads=12, hidden=96, ffn=384, batch=8, seq_len=32,
                   microbatches=4)
    r = plan.predict_layout(job, f2, tgt, 1, 1, 3)
    assert r["p2p_s"] == pytest.approx(5 * (1e-5 + 2 * 32 * 96 * 4 * 1e-9))


def test_best_layout_picks_the_axis():
    """Few heads and many layers: pipeline stages; many heads, few layers and a fast
    Allreduce: heads; one head and one layer: the batch."""
    f = plan.Fit(cores=64, rate=2e10, g=3e-9, p=0.9, h=5e-10, alpha=2e-6, beta=1e-10)
    tgt = plan.Target(64, None, f.alpha, f.beta)

    def best(**shape):
        job = plan.Job(**{"hidden": 96, "ffn": 384, "seq_len": 64, **shape})
        return plan.predict(job, f, tgt, 8, "best")

    # parallel.sequence = 1 fixed: at batch 1 splitting the tokens beats both of these
    # (test_best_layout_splits_long_sequences)
    layers = best(layers=24, heads=2, batch=1, sequence=1)
    assert layers["axis"] == "layers" and layers["pipeline"] >= 4
    assert best(layers=2, heads=12, batch=1, sequence=1)["axis"] == "heads"
    assert best(layers=1, heads=1, batch=8)["axis"] == "batch"
    assert plan.predict(plan.Job(layers=24, heads=2, hidden=96, ffn=384, batch=1,
                                 seq_len=64), f, tgt, 8) is None  # heads first: no pipeline
    job = plan.Job(layers=24, heads=2, hidden=96, ffn=384, batch=1, seq_len=64, sequence=1)
    text = plan.format_plan(job, f, tgt, plan.table(job, f, tgt, [8], "best"), [], "best")
    assert "layers (M=" in text and "GPipe" in text


# --- sequence parallelism (issue #15) ------------------------------------------------------

ALPHA, BETA = 1e-5, 1e-9
SEQ_FIT = plan.Fit(cores=3, rate=1e9, g=0.0, p=1.0, h=0.0, alpha=ALPHA, beta=BETA)
SEQ_TGT = plan.Target(3, None, ALPHA, BETA)  # 3 cores: one thread, a whole core per rank


def test_ring_costs_by_hand_uneven():
    """10 tokens on Q = 3 ranks (4, 3, 3): the slowest rank's 4 queries meet all 10 keys;
    2 shifts of its padded K/V, each hidden behind one slice's attention where it can."""
    job = plan.Job(layers=1, heads=4, hidden=64, ffn=256, batch=2, seq_len=10, sequence=3,
                   seq_algorithm="ring")
    r = plan.predict_layout(job, SEQ_FIT, SEQ_TGT, 1, 1, 1, 3, "ring")
    att = 4 * 2 * 4 * 10 * 64  # 4·B·ceil(S/Q)·S·W
    assert r["attention_flops"] == att and r["local_tokens"] == 4
    linear = 2 * 8 * 64 * 192 + 2 * 8 * 64 * 64 + 4 * 8 * 64 * 256  # N = B·ceil(S/Q) = 8
    assert r["compute_s"] == pytest.approx((linear + att) / 1e9)
    kv = 2 * 4 * 2 * 64 * 4  # 2·B·ceil(S/Q)·W·elt
    assert r["ring_bytes"] == kv and r["ring_shifts"] == 2
    step, transfer = att / 3 / 1e9, ALPHA + kv * BETA
    assert r["ring_hidden_fraction"] == pytest.approx(step / transfer)
    agree = 2 * 2 * ALPHA  # 2·ceil(log2 3)·alpha
    assert r["seq_s"] == pytest.approx(2 * (transfer - step + agree))
    # the head group's Allreduce of the local tokens: float32 rows, float64 checksum rows
    assert r["wire_bytes"] == 8 * 64 * 4 + 2 * 64 * 8
    # a step that outlasts its shift hides it: only the agreements remain
    slow = dataclasses.replace(SEQ_FIT, rate=1e6)
    r = plan.predict_layout(job, slow, SEQ_TGT, 1, 1, 1, 3, "ring")
    assert r["ring_hidden_fraction"] == 1.0 and r["seq_s"] == pytest.approx(2 * agree)


def test_ulysses_costs_by_hand():
    """Q = 2, 4 heads of one head rank, 10 tokens (5 each): two Alltoalls, whole sequences
    over 2 heads per rank; Q = 3 pads the head shares (2, 1, 1) and the slices (4, 3, 3)."""
    job = plan.Job(layers=1, heads=4, hidden=64, ffn=256, batch=2, seq_len=10)
    r = plan.predict_layout(job, SEQ_FIT, SEQ_TGT, 1, 1, 1, 2, "ulysses")
    assert r["algorithm"] == "ulysses"
    assert r["attention_flops"] == 4 * 2 * 10 * 10 * 2 * 16  # 4·B·S·S·(h/Q)·d
    block = 2 * 5 * 2 * 16 * 4  # B·(S/Q)·(h/Q)·d·elt
    assert r["alltoall_bytes"] == [2 * 3 * block, 2 * block]  # Q blocks of Q/K/V; of O
    assert r["alltoall_sent_bytes"] == pytest.approx(0.5 * 8 * block)  # (Q-1)/Q leaves
    one = [ALPHA + 0.5 * x * BETA + ALPHA + 2 * ALPHA for x in r["alltoall_bytes"]]
    assert r["seq_s"] == pytest.approx(sum(one))  # exchange, digests, agreement
    r3 = plan.predict_layout(job, SEQ_FIT, SEQ_TGT, 1, 1, 1, 3, "ulysses")
    assert r3["alltoall_bytes"][1] == 3 * (2 * 4 * 2 * 16 * 4)  # padded: ceil(S/3), ceil(h/3)
    assert r3["attention_flops"] == 4 * 2 * 10 * 10 * 2 * 16


def test_ulysses_needs_a_head_per_sequence_rank():
    """Ulysses is offered only where floor(heads/T) >= Q: never chosen otherwise, a fixed
    choice that cannot run is impossible, "auto" falls back to the ring as the runner does."""
    job = plan.Job(layers=1, heads=3, hidden=96, ffn=384, batch=1, seq_len=4096)
    for n in range(1, 17):
        for r in [plan.predict_layout(job, SEQ_FIT, SEQ_TGT, d, t, p, q, a)
                  for d, t, p, q, a in plan.grid_layouts(job, n, True)]:
            if r["algorithm"] == "ulysses":
                assert 3 // r["tensor"] >= r["sequence"], r
        best = plan.predict(job, SEQ_FIT, SEQ_TGT, n, "best")
        assert best["algorithm"] != "ulysses" or 3 // best["tensor"] >= best["sequence"]
    fixed = dataclasses.replace(job, sequence=4, seq_algorithm="ulysses")
    rows = plan.table(fixed, SEQ_FIT, SEQ_TGT, [4, 8])
    assert all("impossible" in r for r in rows) and "Ulysses" in rows[0]["impossible"]
    auto = dataclasses.replace(job, sequence=4)
    assert plan.predict(auto, SEQ_FIT, SEQ_TGT, 4)["algorithm"] == "ring"
    assert plan.predict(dataclasses.replace(job, sequence=3), SEQ_FIT, SEQ_TGT,
                        3)["algorithm"] == "ulysses"


def test_best_layout_splits_long_sequences():
    """Two heads, one sequence, one layer, 16k tokens on 8 ranks: heads cannot split past 2,
    a pipeline has one layer, the batch one row; the tokens are split, and the memory
    estimate shrinks with them."""
    f = plan.Fit(cores=64, rate=2e10, g=3e-9, p=0.9, h=5e-10, alpha=2e-6, beta=1e-10)
    tgt = plan.Target(64, None, f.alpha, f.beta)
    job = plan.Job(layers=1, heads=2, hidden=128, ffn=512, batch=1, seq_len=16384)
    r = plan.predict(job, f, tgt, 8, "best")
    assert r["axis"] == "sequence" and r["sequence"] >= 4 and r["tensor"] <= 2
    assert r["algorithm"] in ("ring", "ulysses")
    assert plan.predict(job, f, tgt, 8) is None  # heads first, no sequence: 2 heads x 1 row
    mem = [plan.predict_layout(job, f, tgt, 1, 1, 1, q, "ring")["memory_bytes"]
           for q in (1, 2, 4, 8)]
    assert mem == sorted(mem, reverse=True) and mem[-1] < mem[0] / 4
    # a --memory that Q = 1 and 2 exceed: what fits at 2 ranks (if anything) is within it
    limit = (mem[2] + mem[1]) / 2
    two = plan.predict(job, f, tgt, 2, "best", limit)
    assert two is None or (two["memory_bytes"] <= limit and two["sequence"] < 2)
    rows = plan.table(job, f, tgt, [1, 4], "best", limit)
    assert "--memory" in rows[0]["impossible"] and rows[1]["sequence"] == 4


def test_cli_names_the_sequence_algorithm(tmp_path, capsys):
    paths = [str(synthetic_run(tmp_path / f"s{n}.h5", n)) for n in (1, 2)]
    common = ["plan", *paths, "--measured-cores", str(CORES), "--ranks", "4,8", "--set",
              "input.seq_len=4096", "--set", "parallel.sequence=4"]
    assert main([*common, "--set", "attention.sequence=ring"]) == 0
    out = capsys.readouterr().out
    assert "4 ring" in out and "(ring, " in out and "shifts hidden" in out
    assert "Ring: Q-1 shifts" in out and "mem MiB" in out
    assert main([*common, "--set", "attention.sequence=ulysses", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["algorithm"] for r in data["predictions"]] == ["ulysses", "ulysses"]
    assert all(r["sequence"] == 4 and len(r["alltoall_bytes"]) == 2
               for r in data["predictions"])
    assert main([*common, "--layout", "best", "--memory", "0.5"]) == 0
    assert "sequence" in capsys.readouterr().out
    assert main([*common, "--set", "attention.sequence=stripes"]) == 2
    assert main(["plan", *paths, "--set", "parallel.sequence=99999"]) == 2
    assert main(["plan", *paths, "--memory", "-1"]) == 2

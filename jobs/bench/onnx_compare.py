"""The whole job against ONNX Runtime: ``mpiexec -n R mpiattn run`` vs ORT's fused BERT.

    pip install -e ".[test,bench]"     # bench: onnxruntime, onnx (torch, transformers: test)
    python jobs/bench/onnx_compare.py                          # BERT-base, batch 8 x seq 512
    python jobs/bench/onnx_compare.py --runs 7 --gemm --plain-attention -o cmp.json

Both sides do the same job as whole processes, timed from start to exit (wall clock, the
parent's ``perf_counter`` around ``subprocess.run``): BERT-base (12 layers, hidden 768,
12 heads, ffn 3072), ``--batch`` sequences of ``--seq`` tokens with no padding, float32,
random weights, the last hidden state written to an HDF5 file.

- **mpiattn**: ``mpiexec -n R python -m mpiattn run`` with default settings (seeded
  weights, checksums on, float64 wire) and ``input.min_fill=1.0`` (no padding),
  ``output.layers="last"``. Its own /timings (setup, forward, per-phase, per layer) are
  read back from the file.
- **ONNX Runtime**: a transformers ``BertModel`` built from a ``BertConfig`` with random
  weights, exported once with ``torch.onnx.export`` and optimised with
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (fused
  attention, fused GELU, skip-LayerNorm; the fused ops found are printed), cached in the
  work folder. Each run is one process: session on the CPU provider with
  ``intra_op_num_threads = --threads`` (default: the cores), one inference, h5py write.
  ``--plain-attention`` also times the same graph without the attention fusion (every
  other fusion kept), in case ORT's fused CPU attention is the slower of the two.

Runs alternate (mpiattn, ORT, mpiattn, ...) after one untimed warm-up of each (page cache,
model file); the report gives the median of ``--runs`` per side, the ratio mpiattn / ORT
(target <= 0.85), the fastest run of each (steadier when others share the machine),
and mpiattn's own breakdown (median over runs of the slowest rank): setup, forward,
layer 0 against the median layer, phase shares. ``--gemm`` also measures the GEMM limit
(``mpiattn.commands.bench.gemm_rate`` at each rank's GEMM shapes, all ranks at once: the
forward's FLOPs at the summed rate) and reports it over the forward (target >= 0.75).
Nothing is asserted; exit 1 only when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RATIO_MAX = 0.85
GEMM_FRACTION_MIN = 0.75
WORKER_FLAG = "--ort-worker"  # internal: one ONNX Runtime inference in its own process
GEMM_FLAG = "--gemm-worker"  # internal: the GEMM rate under mpiexec
BERT_BASE = dict(layers=12, heads=12, hidden=768, ffn=3072, vocab=30522, positions=512)


def build_onnx(folder: Path, seq: int, fuse_attention: bool = True) -> Path:
    """The optimised BERT-base ONNX graph (made once, then reused); ``fuse_attention``
    False keeps attention as ORT's MatMul/Softmax nodes (every other fusion stays)."""
    final = folder / f"bert-base-opt-s{seq}{'' if fuse_attention else '-noattn'}.onnx"
    if final.is_file():
        return final
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    m = BERT_BASE
    raw = folder / f"bert-base-s{seq}.onnx"
    if not raw.is_file():
        export_bert(raw, seq)
    options = FusionOptions("bert")
    options.enable_attention = fuse_attention
    opt = optimize_model(str(raw), model_type="bert", num_heads=m["heads"],
                         hidden_size=m["hidden"], optimization_options=options)
    fused = opt.get_fused_operator_statistics()
    print(f"ONNX Runtime fusions: {json.dumps({k: v for k, v in fused.items() if v})}",
          flush=True)
    if fuse_attention and not (fused.get("Attention") or fused.get("MultiHeadAttention")):
        sys.exit("onnx_compare: ONNX Runtime fused no attention in the exported graph"
                 " (a transformers version whose attention export it does not know?)")
    opt.save_model_to_file(str(final))
    return final


def export_bert(raw: Path, seq: int) -> None:
    """A transformers BertModel (random weights, no pooler) exported with torch.onnx."""
    import torch
    from transformers import BertConfig, BertModel

    m = BERT_BASE
    config = BertConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                        intermediate_size=m["ffn"], hidden_act="gelu",
                        max_position_embeddings=max(m["positions"], seq))
    config._attn_implementation = "eager"  # the graph pattern ORT's attention fusion knows
    torch.manual_seed(0)
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Wrapper(torch.nn.Module):  # keyword arguments: BertModel's positions vary
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask, types):
            return self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types,
                             return_dict=False)[0]

    ids = torch.randint(0, m["vocab"], (1, seq))
    with torch.no_grad():
        torch.onnx.export(Wrapper().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                          str(raw), input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                        ("input_ids", "attention_mask", "token_type_ids",
                                         "last_hidden_state")},
                          opset_version=17, dynamo=False)


def ort_worker(model: str, out: str, batch: int, seq: int, threads: int) -> None:
    """One inference, the last hidden state to HDF5 (what the timed ORT process does)."""
    import h5py
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BERT_BASE["vocab"], (batch, seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    t0 = time.perf_counter()
    (hidden,) = session.run(["last_hidden_state"], feeds)
    forward = time.perf_counter() - t0
    with h5py.File(out, "w") as f:
        f["last_hidden_state"] = hidden
        f.attrs["forward_s"] = forward


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"onnx_compare: '{' '.join(cmd)}' failed with exit {proc.returncode}"
                 f" (log: {log})")
    return wall


def mpiattn_breakdown(path: Path) -> dict[str, float]:
    """setup, forward, layer 0 and the median layer (slowest rank), phase shares."""
    import h5py

    with h5py.File(path, "r") as f:
        seconds = f["timings/seconds"][:]  # (ranks, layers, phases)
        phases = [p.decode() for p in f["timings/phase"][:]]
        per_layer = seconds.sum(axis=2).max(axis=0)
        shares = seconds.sum(axis=1).mean(axis=0)
        out = {"setup": float(f["timings/setup"][:].max()),
               "forward": float(f["timings/forward"][:].max()),
               "layer0": float(per_layer[0]), "layer_median": float(np.median(per_layer))}
    out.update({f"share_{p}": float(s / shares.sum()) for p, s in zip(phases, shares,
                                                                       strict=True)})
    return out


def gemm_worker(batch: int, seq: int) -> None:
    """Under mpiexec: every rank's best SGEMM rate at its shard's GEMM shapes, all ranks
    busy at once (``mpiattn.commands.bench.gemm_rate``); rank 0 prints their sum."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from mpiattn.commands.bench import gemm_rate

    world = MPI.COMM_WORLD
    ranks, m = world.Get_size(), BERT_BASE
    w, f = m["hidden"] // ranks, m["ffn"] // ranks
    rows, h = batch * seq, m["hidden"]
    with threadpool_limits(max(1, (os.cpu_count() or 1) // ranks), user_api="blas"):
        rate = gemm_rate(np, [(rows, h, 3 * w), (rows, w, h), (rows, h, f), (rows, f, h)],
                         np.float32, world, lambda: None, 5)
    rates = world.gather(rate)
    if world.Get_rank() == 0:
        print(json.dumps({"rates": rates}))


def gemm_limit(work: Path, ranks: int, batch: int, seq: int, env: dict[str, str]) -> float:
    """Seconds of the forward's FLOPs (GEMMs and attention products) at the summed
    measured GEMM rate of all ranks."""
    log = work / "gemm.log"
    timed(["mpiexec", "-n", str(ranks), sys.executable, __file__, GEMM_FLAG,
           "--batch", str(batch), "--seq", str(seq)], env, log)
    rate = sum(json.loads(log.read_text().strip().splitlines()[-1])["rates"])
    m = BERT_BASE
    tokens, h, f, heads = batch * seq, m["hidden"], m["ffn"], m["heads"]
    per_layer = 2 * tokens * h * (3 * h + h + 2 * f) + 4 * batch * heads * seq * seq * (
        h // heads)
    return m["layers"] * per_layer / rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per side (interleaved)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="ONNX Runtime intra-op threads (default: the cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gemm", action="store_true", help="also measure the GEMM limit")
    ap.add_argument("--plain-attention", action="store_true",
                    help="also time ORT without its attention fusion (every other fusion kept)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnx-compare",
                    help="work folder (the ONNX model is cached here)")
    ap.add_argument("-o", "--output", type=Path, help="results as JSON")
    ap.add_argument(WORKER_FLAG, nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument(GEMM_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gemm_worker:
        gemm_worker(args.batch, args.seq)
        return 0
    if args.ort_worker:
        ort_worker(*args.ort_worker, args.batch, args.seq, args.threads)
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_onnx(args.work, args.seq)
    plain = build_onnx(args.work, args.seq, fuse_attention=False) if args.plain_attention \
        else None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    mpi_env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.ranks)))
    ort_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    mpi_out, ort_out = args.work / "mpiattn.h5", args.work / "ort.h5"
    mpi_cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "mpiattn", "run",
               "--set", f"input.batch={args.batch}", "--set", f"input.seq_len={args.seq}",
               "--set", "input.min_fill=1.0", "--set", 'output.layers="last"',
               "-o", str(mpi_out), "--force"]
    ort_cmd = [sys.executable, __file__, WORKER_FLAG, str(model), str(ort_out),
               "--batch", str(args.batch), "--seq", str(args.seq),
               "--threads", str(args.threads)]
    sides = [("mpiattn", mpi_cmd, mpi_env), ("ort", ort_cmd, ort_env)]
    if plain is not None:
        sides.append(("ort_plain_attention", [*ort_cmd[:3], str(plain), *ort_cmd[4:]],
                      ort_env))
    walls: dict[str, list[float]] = {side: [] for side, _, _ in sides}
    breakdowns, ort_forward = [], []
    for i in range(args.runs + 1):  # run 0 warms the page cache, untimed
        for side, cmd, e in sides:
            wall = timed(cmd, e, args.work / f"{side}.log")
            if i == 0:
                continue
            walls[side].append(wall)
            if side == "mpiattn":
                breakdowns.append(mpiattn_breakdown(mpi_out))
            elif side == "ort":
                import h5py

                with h5py.File(ort_out, "r") as f:
                    ort_forward.append(float(f.attrs["forward_s"]))
            extra = ""
            if side == "mpiattn":
                extra = (f" (setup {breakdowns[-1]['setup']:.3f} s, forward"
                         f" {breakdowns[-1]['forward']:.3f} s)")
            print(f"run {i}: {side} {wall:.3f} s{extra}", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    mine = {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
    result = {"shape": f"BERT-base, batch {args.batch} x seq {args.seq}, float32",
              "ranks": args.ranks, "ort_threads": args.threads, "runs": args.runs,
              "host": platform.node(), "cores": os.cpu_count(), "walls": walls,
              "median_s": med, "ratio": med["mpiattn"] / med["ort"],
              "ort_inference_s": statistics.median(ort_forward), "mpiattn": mine}
    if args.gemm:
        limit = gemm_limit(args.work, args.ranks, args.batch, args.seq, mpi_env)
        result["gemm_limit_s"] = limit
        result["forward_vs_gemm_limit"] = limit / mine["forward"]
    print(f"{result['shape']}; mpiattn {args.ranks} ranks, ORT {args.threads} threads;"
          f" medians of {args.runs} interleaved runs")
    best = {k: min(v) for k, v in walls.items()}
    result["best_s"], result["best_ratio"] = best, best["mpiattn"] / best["ort"]
    print(f"fastest runs (steadier on a shared machine): mpiattn {best['mpiattn']:.3f} s,"
          f" ONNX Runtime {best['ort']:.3f} s, ratio {result['best_ratio']:.3f}")
    print(f"wall: mpiattn {med['mpiattn']:.3f} s, ONNX Runtime {med['ort']:.3f} s"
          f" (inference alone {result['ort_inference_s']:.3f} s); ratio"
          f" {result['ratio']:.3f} (target <= {RATIO_MAX})")
    if plain is not None:
        print(f"ONNX Runtime without its attention fusion: {med['ort_plain_attention']:.3f} s;"
              f" mpiattn / that {med['mpiattn'] / med['ort_plain_attention']:.3f}")
    print(f"mpiattn: setup {mine['setup']:.3f} s, forward {mine['forward']:.3f} s, layer 0"
          f" {mine['layer0']:.3f} s vs median layer {mine['layer_median']:.3f} s; "
          + ", ".join(f"{k[6:]} {100 * v:.0f}%" for k, v in mine.items()
                      if k.startswith("share_")))
    if args.gemm:
        print(f"GEMM limit {result['gemm_limit_s']:.3f} s: forward at"
              f" {result['forward_vs_gemm_limit']:.2f} of it (target >= {GEMM_FRACTION_MIN})")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mpiattn report``: tables, JSON, CSV and plots from finished HDF5 files, offline.

    mpiattn report run.h5                       # per-phase table, partition, checksums
    mpiattn report s1.h5 s2.h5 s4.h5 --plot scaling.png    # + strong scaling
    mpiattn report run.h5 --json                # everything the tables show, per rank
    mpiattn report bench.h5                     # kernels, phases, Allreduce (nccl-tests)
    mpiattn report bench.h5 --csv > ar.csv      # the Allreduce table as CSV
    mpiattn report --heads run.h5 --plot heads.png   # per-head entropy/distance heatmaps

Built on the Python API (``mpiattn.open``, ``mpiattn/io/formats/``): ``load`` reads what the
tables need through it, in its NumPy forms, so report needs only h5py and NumPy (no MPI,
no SciPy, no pandas); matplotlib only for ``--plot``. Reads any format version it finds
and skips the groups a file does not have, so one command reads run, bench, training and
checkpoint files. Files are read through ``h5safe``: only bytes inside the file, bounded
reads, UTF-8 text; a file that is hostile or malformed (wrong types, shapes or dtypes, a
`config` attribute over 1 MiB) is one error line naming it (exit code 2 in the CLI), never
a traceback. Non-finite numbers are shown (``nan``) and written as ``null`` in ``--json``;
``mpiattn verify`` is what fails such a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UserError
from ..io import formats as api
from ..io import h5safe, outfile
from ..io.formats.bench import NCCL_COLUMNS, NCCL_UNITS
from ..io.formats.reading import Columns, integer, malformed

KNOWN_FORMAT = 2  # 2 added dimension scales; what report reads is alike in 1 and 2
_int = integer
ALLREDUCE_CSV = (*NCCL_COLUMNS, "spread", "copy_time", "copy_bw", "ranks", "file")


@dataclass
class Loaded:
    """What the analysis needs from one file, read whole (the file is closed again);
    absent parts stay None / empty."""

    path: str
    kind: str  # run, bench, train, checkpoint or unknown (``files.open``'s class)
    format_version: int
    command: str
    config: dict  # the parsed `config` TOML ({} when missing or unreadable)
    world_size: int
    tensor_parallel: int
    data_parallel: int
    head_partition: list[int]
    attrs: dict  # the other root attributes, as plain values
    pipeline_parallel: int = 1
    sequence_parallel: int = 1
    phases: list[str] = field(default_factory=list)
    seconds: np.ndarray | None = None  # (rank, layer | step, phase) [s]
    axis: str = "layer"  # the name of seconds' middle axis (its dimension label)
    forward: np.ndarray | None = None  # (rank,) [s]
    setup: np.ndarray | None = None
    total: np.ndarray | None = None
    hosts: list[str] = field(default_factory=list)
    ranks: Columns = field(default_factory=dict)  # ``File.ranks``: one row per rank
    collectives: Columns | None = None  # ``File.collectives``
    train: dict[str, np.ndarray] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # entropy, distance (L, H)
    head_attrs: dict[str, Any] = field(default_factory=dict)  # query_tokens, map shape

    @property
    def model(self) -> dict:
        section = self.config.get("model", {})
        return section if isinstance(section, dict) else {}

    @property
    def input(self) -> dict:
        section = self.config.get("input", {})
        return section if isinstance(section, dict) else {}

    @property
    def forward_s(self) -> float | None:
        """What a strong-scaling table compares: the slowest rank's forward time."""
        return float(self.forward.max()) if self.forward is not None else None


def load(path: str | Path) -> Loaded:
    """Read one file written by mpiattn (run, train, bench or checkpoint) through
    ``mpiattn.open``, tolerating missing parts.

    Only the file's own bytes are read, within bounds (``h5safe``). A missing, hostile or
    malformed file raises one ``InputError`` line naming ``path``.
    """
    with api.open(path) as f:
        try:
            rf = _read(f)
        except InputError as err:
            text = str(err)
            raise InputError(text if text.startswith(f"'{path}'") else f"'{path}': {text}"
                             ) from None
        except h5safe.MALFORMED as err:
            raise malformed(path, err) from None
    if rf.format_version > KNOWN_FORMAT:
        print(f"mpiattn report: note: {path} has format_version {rf.format_version} (this"
              f" reader knows {KNOWN_FORMAT}); reading what it recognises", file=sys.stderr)
    return rf


def _read(f: api.AnyFile) -> Loaded:
    rf = Loaded(path=f.path, kind=f.kind, format_version=f.format_version, command=f.command,
                config=f.config, world_size=f.world_size, tensor_parallel=f.tensor_parallel,
                data_parallel=f.data_parallel, head_partition=f.head_partition, attrs=f.attrs,
                pipeline_parallel=f.pipeline_parallel, sequence_parallel=f.sequence_parallel)
    if not isinstance(f, api.BenchFile):  # a bench file's timings are of one layer
        _read_timings(f, rf)
    table = f.ranks(raw=True)
    assert isinstance(table, dict)
    rf.ranks = table
    for name in ("forward", "setup", "total"):
        value = table.get(f"{name}_s")
        if value is not None and value.size:
            setattr(rf, name, value.astype(float))
    rf.hosts = [str(h) for h in table.get("host", [])]
    collectives = f.collectives(raw=True)
    assert collectives is None or isinstance(collectives, dict)
    rf.collectives = collectives
    if isinstance(f, api.TrainFile):
        _read_train(f, rf)
    if isinstance(f, api.BenchFile):
        rf.bench = _read_bench(f, table)
    if isinstance(f, api.RunFile):
        _read_heads(f, rf)
    return rf


def _read_timings(f: api.AnyFile, rf: Loaded) -> None:
    """/timings/seconds as (rank, layer | step, phase), with its phase names and axis."""
    lab = f.timings(raw=True)
    if lab is None:
        return
    assert isinstance(lab, api.Labelled)
    sec = lab.values[:, None, :] if lab.values.ndim == 2 else lab.values  # no layer axis
    rf.seconds = sec
    rf.phases = _phase_names(lab)
    rf.axis = lab.dims[1] if lab.values.ndim == 3 else "layer"


def _phase_names(lab: api.Labelled) -> list[str]:
    """The last axis' coordinates as names (phase0, ... when the file names none)."""
    names = lab.coords[lab.dims[-1]]
    if names.dtype.kind in "biuf":
        return [f"phase{i}" for i in range(lab.values.shape[-1])]
    return [str(n) for n in names]


def _read_train(f: api.TrainFile, rf: Loaded) -> None:
    history = f.history(raw=True)
    if isinstance(history, dict):
        rf.train.update({k: np.asarray(v, dtype=float) for k, v in history.items()})
    evals = f.evals(raw=True)
    if isinstance(evals, dict):
        rf.train["eval_loss"] = evals["eval_loss"]
        rf.train["eval_step"] = evals["step"].astype(float)


def _read_bench(f: api.BenchFile, ranks: Columns) -> dict[str, Any]:
    """The Allreduce table (nccl-tests columns; and as bytes, seconds, ranks for ``plan``),
    the per-rank GEMM rates, the one-layer phase times, the kernels, the sweep, the scalar
    results."""
    out: dict[str, Any] = {}
    table = f.allreduce(raw=True)
    if isinstance(table, dict):
        out["nccl"] = table
        out["allreduce"] = {"bytes": table["size"].astype(float),
                            "seconds": table["time"] * 1e-6,
                            "ranks": table["ranks"].astype(float)}
    if "gemm_flops_per_second" in ranks:
        out["gemm_flops_per_second"] = ranks["gemm_flops_per_second"].astype(float)
    lab = f.timings(raw=True)
    if isinstance(lab, api.Labelled):  # (rank, phase), one layer
        out["phase_seconds"] = np.atleast_2d(lab.values.reshape(lab.values.shape[0], -1))
        out["phases"] = _phase_names(lab)
    kernels = f.kernels(raw=True)
    if isinstance(kernels, dict) and len(kernels["name"]):
        out["kernels"] = kernels
    sweep = f.sweep(raw=True)
    if isinstance(sweep, dict):
        out["sweep"] = sweep
    sequence = f.sequence(raw=True)
    if isinstance(sequence, dict):
        out["sequence"] = sequence
        out["sequence_attrs"] = f.sequence_attrs()
    results = f.results
    pipe = f.pipeline()
    if pipe:
        out["pipeline"] = pipe
    out["results"] = results
    out["checksum_mode"] = str(results.get("checksum_mode", ""))
    return out


def _read_heads(f: api.RunFile, rf: Loaded) -> None:
    """/heads/entropy and /heads/distance (layer, head), the query-token count, and the
    shape of /heads/maps (the maps themselves are not read)."""
    stats = f.head_stats(raw=True)
    for name, lab in (stats or {}).items():
        rf.heads[name] = np.asarray(lab.values, dtype=float)
    tokens = f.query_tokens
    if tokens is not None:
        rf.head_attrs["query_tokens"] = tokens
    maps = f.attention_maps
    if maps is not None:
        rf.head_attrs["maps_shape"] = list(maps.shape)


# --- one file ---------------------------------------------------------------------------

def _phase_rows(per_rank: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Per phase of a (rank, phase) array: mean over ranks, max, max/mean."""
    table = {}
    for i, name in enumerate(names):
        mean, top = float(per_rank[:, i].mean()), float(per_rank[:, i].max())
        table[name] = {"mean_s": mean, "max_s": top,
                       "imbalance": top / mean if mean > 0 else 1.0}
    return table


def phase_table(rf: Loaded) -> dict[str, dict[str, float]] | None:
    """Per phase: mean over ranks of the per-rank sum over layers (steps), max, max/mean;
    a bench file's: of its one timed layer."""
    if rf.seconds is not None:
        return _phase_rows(rf.seconds.sum(axis=1), rf.phases)
    if "phase_seconds" in rf.bench:
        return _phase_rows(rf.bench["phase_seconds"], rf.bench["phases"])
    return None


def checksum_summary(rf: Loaded) -> dict[str, Any] | None:
    t = rf.collectives
    if t is None:
        return None
    out: dict[str, Any] = {"count": len(next(iter(t.values()), []))}
    if "passed" in t:
        out["passed"] = int(np.asarray(t["passed"]).astype(bool).sum())
    if "ratio" in t and out["count"]:
        out["max_ratio"] = float(np.max(t["ratio"]))
    if "retries" in t:
        out["retries"] = int(np.sum(t["retries"]))
    return out


def train_summary(rf: Loaded) -> dict[str, Any] | None:
    if not rf.train:
        return None
    out: dict[str, Any] = {}
    loss = rf.train.get("loss")
    if loss is not None and loss.size:
        out.update(steps=int(loss.size), first_loss=float(loss[0]), last_loss=float(loss[-1]),
                   min_loss=_ignoring_nan(np.min, loss))
    ev = rf.train.get("eval_loss")
    if ev is not None and ev.size:
        out["last_eval_loss"] = float(ev[-1])
        steps = rf.train.get("eval_step")
        if steps is not None and steps.size == ev.size:
            out["last_eval_step"] = int(steps[-1])
    tps = rf.train.get("tokens_per_second")
    if tps is not None and tps.size:
        out["tokens_per_second_mean"] = _ignoring_nan(np.mean, tps)
    return out


def heads_summary(rf: Loaded, tables: bool = False) -> dict[str, Any] | None:
    """Per-head statistics: means over all (layer, head), the query tokens they average
    over, the maps' shape; with ``tables`` the (layer, head) arrays themselves."""
    if not rf.heads and not rf.head_attrs:
        return None
    out: dict[str, Any] = dict(rf.head_attrs)
    for name, units in (("entropy", "nats"), ("distance", "tokens")):
        value = rf.heads.get(name)
        if value is not None:
            out[f"mean_{name}_{units}"] = _ignoring_nan(np.mean, value.ravel())
            if tables:
                out[name] = value
    return out


def _ignoring_nan(fn: Any, values: np.ndarray) -> float:
    """``fn`` over the values that are not NaN (NaN when there are none), without the
    RuntimeWarning of ``np.nanmin``/``np.nanmean`` on an all-NaN array."""
    kept = values[~np.isnan(values)]
    return float(fn(kept)) if kept.size else float("nan")


def summarize(rf: Loaded, heads: bool = False) -> dict[str, Any]:
    """One file's summary; ``heads``: with the (layer, head) statistics tables."""
    m = rf.model
    out: dict[str, Any] = {
        "path": rf.path, "format_version": rf.format_version, "command": rf.command,
        "status": rf.attrs.get("status"), "world_size": rf.world_size or None,
        "tensor_parallel": rf.tensor_parallel, "data_parallel": rf.data_parallel,
        "pipeline_parallel": rf.pipeline_parallel, "sequence_parallel": rf.sequence_parallel,
        "head_partition": rf.head_partition, "backend": rf.attrs.get("backend"),
        "cuda_aware": rf.attrs.get("cuda_aware"), "timing": rf.attrs.get("timing"),
        "devices": sorted({str(d) for d in rf.ranks.get("device", [])}),
        "dtype": rf.config.get("dtype"),
        "model": {k: m[k] for k in ("layers", "heads", "hidden", "ffn") if k in m},
        "input": {k: rf.input[k] for k in ("batch", "seq_len") if k in rf.input},
    }
    if rf.command == "run" and "lines" in rf.attrs:  # a streamed text run (ragged rows)
        out["input"] = {"lines": _int(rf.attrs.get("lines"), "attribute 'lines'", 0),
                        "tokens": _int(rf.attrs.get("tokens"), "attribute 'tokens'", 0),
                        "micro_batch": rf.input.get("batch", "?")}
    for name in ("forward", "setup", "total"):
        value = getattr(rf, name)
        if value is not None:
            out[f"{name}_s"] = float(value.max())
    memory = rf.ranks.get("peak_memory_bytes")
    if memory is not None and len(memory):
        out["peak_memory_bytes"] = int(np.max(memory))
    if rf.seconds is not None and rf.seconds.shape[1] >= 3 and rf.axis == "layer":
        layer = rf.seconds.sum(axis=2)  # (rank, layer); training files: (rank, step)
        extra = float(np.max(layer[:, 0] - np.median(layer[:, 1:], axis=1)))
        out["first_layer_extra_s"] = extra
    for key, fn in (("phases", phase_table), ("checksum", checksum_summary),
                    ("train", train_summary),
                    ("heads", lambda r: heads_summary(r, tables=heads)),
                    ("bench", bench_summary)):
        value = fn(rf)
        if value is not None:
            out[key] = value
    if "phases" in out:
        out["phases_over"] = (f"{rf.axis}s" if rf.seconds is not None else "one layer")
    out["ranks"] = per_rank(rf)
    return out


def per_rank(rf: Loaded) -> list[dict[str, Any]]:
    """One dict per rank: its ``File.ranks`` columns (host, device, forward_s, setup_s,
    total_s, peak_memory_bytes, ...; gemm_flops_per_second, layer_s of a bench file) and
    ``phase_s``, its time per phase summed over layers (steps; a bench file: one layer)."""
    per_phase = None
    if rf.seconds is not None:
        per_phase, names = rf.seconds.sum(axis=1), rf.phases
    elif "phase_seconds" in rf.bench:
        per_phase, names = rf.bench["phase_seconds"], rf.bench["phases"]
    count = max(len(rf.ranks.get("rank", ())), 0 if per_phase is None else len(per_phase))
    rows: list[dict[str, Any]] = [{"rank": r} for r in range(count)]
    for name, values in rf.ranks.items():
        if name != "rank":
            for row, value in zip(rows, values, strict=False):
                row[name] = value
    if per_phase is not None:
        for row, values in zip(rows, per_phase, strict=False):
            row["phase_s"] = dict(zip(names, values.tolist(), strict=True))
    return rows


def bench_summary(rf: Loaded) -> dict[str, Any] | None:
    """A bench file's results: the summed GEMM limit, the kernels (median, spread, FLOP/s,
    fraction of the limit), the Allreduce table in nccl-tests columns, the sweep, the
    scalars (checksum_overhead, imbalance, checksum_mode, allreduce_ranks)."""
    b = rf.bench
    if not b:
        return None
    out: dict[str, Any] = dict(b.get("results", {}))
    if "gemm_flops_per_second" in b:
        out["gemm_limit_flops_per_second"] = float(np.sum(b["gemm_flops_per_second"]))
    if "kernels" in b:
        k = b["kernels"]
        out["kernels"] = {str(name): {c: float(k[c][i]) for c in k if c != "name"}
                          for i, name in enumerate(k["name"])}
    if "nccl" in b:
        t = b["nccl"]
        out["allreduce"] = {"units": NCCL_UNITS, "rows": [
            {c: t[c][i] for c in t} for i in range(len(t["size"]))]}
    if "pipeline" in b:
        out["pipeline"] = dict(b["pipeline"])
    if "sweep" in b:
        s = b["sweep"]
        out["sweep"] = [{c: s[c][i] for c in s} for i in range(len(next(iter(s.values()))))]
    if "sequence" in b:
        s = b["sequence"]
        out["sequence"] = {**b.get("sequence_attrs", {}), "rows": [
            {c: _plain(s[c][i]) for c in s} for i in range(len(s["seq_len"]))]}
    return out


def _plain(x: Any) -> Any:
    """A NumPy scalar as a Python number (JSON), NaN kept."""
    return x.item() if isinstance(x, np.generic) else x


# --- several files ------------------------------------------------------------------------

def same_model(files: list[Loaded]) -> list[str]:
    """Differences in [model], [input] (and dtype) between the first file and the others."""
    problems = []
    ref = files[0]
    for rf in files[1:]:
        for section in ("model", "input"):
            a, b = ref.config.get(section), rf.config.get(section)
            if not isinstance(a, dict) or not isinstance(b, dict):
                problems.append(f"{rf.path}: no [{section}] in its config attribute")
                continue
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    problems.append(f"{rf.path}: {section}.{key} = {b.get(key)!r}, but"
                                    f" {ref.path} has {a.get(key)!r}")
        if ref.config.get("dtype") != rf.config.get("dtype"):
            problems.append(f"{rf.path}: dtype {rf.config.get('dtype')!r}, but {ref.path} has"
                            f" {ref.config.get('dtype')!r}")
    return problems


def scaling(files: list[Loaded]) -> dict[str, Any]:
    """Strong scaling: per rank count the best forward time, speed-up and efficiency."""
    timed = [rf for rf in files if rf.forward_s is not None and rf.world_size > 0]
    differences = same_model(timed) if timed else []
    best: dict[int, Loaded] = {}
    for rf in timed:
        n = rf.world_size
        if n not in best or rf.forward_s < best[n].forward_s:  # type: ignore[operator]
            best[n] = rf
    rows = []
    if best:
        n0 = min(best)
        t0 = best[n0].forward_s
        for n in sorted(best):
            t = best[n].forward_s
            speedup = t0 / t if t else float("nan")
            rows.append({"ranks": n, "layout": f"{best[n].data_parallel}x{best[n].tensor_parallel}",
                         "forward_s": t, "speedup": speedup,
                         "efficiency": speedup * n0 / n, "path": best[n].path})
    return {"same_model": not differences, "differences": differences,
            "rows": rows, "repeated": len(timed) - len(best)}


# --- output -----------------------------------------------------------------------------

def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['path']}: {s['command'] or '?'} (format {s['format_version']}),"
             f" status {s['status'] or '?'}"]
    m, i = s["model"], s["input"]
    if m:
        lines.append(f"  model     {m.get('layers', '?')} layers, {m.get('heads', '?')} heads,"
                     f" hidden {m.get('hidden', '?')}, ffn {m.get('ffn', '?')};"
                     + (f" {i['lines']} lines, {i['tokens']} tokens in micro-batches of"
                        f" {i['micro_batch']}," if "lines" in i else
                        f" batch {i.get('batch', '?')} x seq {i.get('seq_len', '?')},")
                     + f" {s.get('dtype') or '?'}, {s.get('backend') or '?'}"
                     + (f" (CUDA-aware MPI: {s['cuda_aware']})"
                        if s.get("backend") == "cupy" and s.get("cuda_aware") else ""))
    if s["world_size"]:
        axes = "".join(f" x {s[f'{axis}_parallel']} {axis}" for axis in ("pipeline", "sequence")
                       if s[f"{axis}_parallel"] > 1)
        lines.append(f"  ranks     {s['world_size']} = {s['data_parallel']} data{axes} x"
                     f" {s['tensor_parallel']} head; heads per rank {s['head_partition']}")
    elif s["command"] == "train checkpoint":  # whole tensors: any layout resumes from it
        lines.append(f"  tensors   whole (written by a job with {s['tensor_parallel']}"
                     " head ranks; any layout resumes from it, `mpiattn export` converts it)")
    times = [f"{k} {s[f'{k}_s']:.4f} s" for k in ("forward", "setup", "total") if f"{k}_s" in s]
    if times:
        lines.append("  time      " + ", ".join(times) + " (max over ranks)")
    if "peak_memory_bytes" in s:
        lines.append(f"  memory    peak {s['peak_memory_bytes'] / 2**30:.2f} GiB per rank (max"
                     " over ranks)")
    if s.get("backend") == "cupy" and s.get("devices"):  # where a GPU run ran, how it timed
        lines.append(f"  devices   {', '.join(s['devices'])}; times from"
                     f" {s.get('timing') or 'an unrecorded clock'}")
    phases = s.get("phases")
    if phases:
        total = sum(v["mean_s"] for v in phases.values()) or 1.0
        lines.append(f"  {'phase':<12}{'mean s':>10}{'max s':>10}{'imbalance':>11}{'share':>8}")
        for name, v in phases.items():
            lines.append(f"  {name:<12}{v['mean_s']:>10.4f}{v['max_s']:>10.4f}"
                         f"{v['imbalance']:>11.3f}{100 * v['mean_s'] / total:>7.1f}%")
        over = s.get("phases_over", "layers")
        lines.append("  (mean over ranks of " + (f"the per-rank sum over {over}" if over !=
                     "one layer" else "one layer's time") + "; imbalance = max/mean)")
        extra = s.get("first_layer_extra_s", 0.0)
        layers = m.get("layers")
        layers = layers if isinstance(layers, int) and 1 <= layers < 2**63 else 1
        if extra > 0.2 * total / layers:
            lines.append(f"  note: layer 0 took {extra:.4f} s more than the median layer"
                         " (first-call warm-up inside its phases)")
    c = s.get("checksum")
    if c:
        lines.append(f"  checksums {c['count']} collectives, {c.get('passed', '?')} passed,"
                     f" max residual/bound {c.get('max_ratio', float('nan')):.3g},"
                     f" {c.get('retries', 0)} retries")
    t = s.get("train")
    if t:
        parts = []
        if "first_loss" in t:
            parts.append(f"loss {t['first_loss']:.4f} -> {t['last_loss']:.4f} over"
                         f" {t['steps']} steps (min {t['min_loss']:.4f})")
        if "last_eval_loss" in t:
            at = f" at step {t['last_eval_step']}" if "last_eval_step" in t else ""
            parts.append(f"last eval loss {t['last_eval_loss']:.4f}{at}")
        if "tokens_per_second_mean" in t:
            parts.append(f"{t['tokens_per_second_mean']:.0f} tokens/s")
        lines.append("  training  " + "; ".join(parts))
    if s.get("bench"):
        lines += format_bench(s["bench"])
    h = s.get("heads")
    if h:
        if "mean_entropy_nats" in h and "mean_distance_tokens" in h:
            lines.append(f"  heads     mean entropy {h['mean_entropy_nats']:.4f} nats, mean"
                         f" distance {h['mean_distance_tokens']:.3f} tokens (over"
                         f" {h.get('query_tokens', '?')} query tokens)")
        if "maps_shape" in h:
            lines.append(f"  maps      {' x '.join(map(str, h['maps_shape']))} (sequence,"
                         " layer, head, query, key) in /heads/maps")
        for name, units in (("entropy", "nats"), ("distance", "tokens")):
            if name in h:
                lines += _head_table(f"mean attention {name} [{units}]", h[name])
    return "\n".join(lines)


def format_bench(b: dict[str, Any]) -> list[str]:
    """A bench file's results as text: GEMM limit, kernels, the scalars, the Allreduce
    table in nccl-tests' layout, the sweep."""
    lines = []
    limit = b.get("gemm_limit_flops_per_second")
    if limit is not None:
        lines.append(f"  gemm      limit {limit / 1e9:.2f} GFLOP/s (sum over ranks of the best"
                     " matmul rate at the layer's shapes)")
    if "kernels" in b:
        lines.append(f"  {'kernel':<16}{'median ms':>11}{'spread ms':>11}{'GFLOP/s':>10}"
                     f"{'of limit':>10}")
        for name, k in b["kernels"].items():
            lines.append(f"  {name:<16}{k['median_s'] * 1e3:>11.3f}{k['spread_s'] * 1e3:>11.3f}"
                         f"{k['flops_per_second'] / 1e9:>10.3f}{k['fraction_of_peak']:>10.3f}")
    pipe = b.get("pipeline")
    if pipe:
        lines.append(f"  pipeline  {int(pipe.get('stages', 0))} stages x"
                     f" {int(pipe.get('microbatches', 0))} micro-batches: bubble"
                     f" {pipe.get('bubble_fraction', float('nan')):.3f} measured vs"
                     f" {pipe.get('ideal_bubble_fraction', float('nan')):.3f} ideal"
                     " (P-1)/(M+P-1); per layer"
                     f" {pipe.get('time_per_layer_s', float('nan')) * 1e3:.3f} ms")
    scalars = []
    if "imbalance" in b:
        scalars.append(f"imbalance {b['imbalance']:.3f} (max/mean layer time over ranks)")
    if "checksum_overhead" in b:
        scalars.append(f"checksums on/off {b['checksum_overhead']:.3f}"
                       f" ({b.get('checksum_mode') or '?'})")
    if scalars:
        lines.append("  layer     " + "; ".join(scalars))
    if "allreduce" in b:
        rows = b["allreduce"]["rows"]
        ranks = sorted({int(r["ranks"]) for r in rows})
        lines.append(f"  allreduce over {', '.join(map(str, ranks))} rank(s), out-of-place"
                     " (nccl-tests columns; busbw = algbw x 2(n-1)/n; #wrong N/A: not checked):")
        lines += ["  " + line for line in nccl_table(rows)]
    if "sweep" in b:
        lines.append(f"  {'sweep':<8}{'seq_len':>9}{'layer ms':>11}{'GFLOP/s':>10}")
        for row in b["sweep"]:
            lines.append(f"  {'':<8}{row.get('seq_len', float('nan')):>9.0f}"
                         f"{row.get('seconds', float('nan')) * 1e3:>11.3f}"
                         f"{row.get('flops_per_second', float('nan')) / 1e9:>10.3f}")
    if "sequence" in b:
        lines += format_sequence(b["sequence"])
    return lines


def format_sequence(seq: dict[str, Any]) -> list[str]:
    """The sequence-parallel sweep: per length the layer and attention block, the share of
    the layer inside the sequence transfers, the bytes a rank sent, the peak RSS per rank
    and (ring) the fraction of the transfer time hidden behind compute."""
    nan = float("nan")
    lines = [f"  sequence  {seq.get('algorithm', '?')} over parallel.sequence ="
             f" {seq.get('parts', '?')}; peak RSS: {seq.get('memory_method', '?')}",
             f"  {'seq_len':>9}{'layer s':>10}{'attn s':>10}{'GFLOP/s':>9}{'xfer %':>8}"
             f"{'MiB sent':>10}{'RSS GiB':>9}{'hidden':>8}"]
    for row in seq.get("rows", []):
        lines.append(f"  {row.get('seq_len', 0):>9.0f}{row.get('layer_s', nan):>10.3f}"
                     f"{row.get('attention_block_s', nan):>10.3f}"
                     f"{row.get('layer_flops_per_second', nan) / 1e9:>9.2f}"
                     f"{100 * row.get('transfer_share', nan):>8.1f}"
                     f"{row.get('transfer_bytes', nan) / 2**20:>10.1f}"
                     f"{row.get('peak_rss', nan) / 2**30:>9.2f}"
                     f"{row.get('hidden_fraction', nan):>8.2f}")
    if any("hidden_fraction" in row for row in seq.get("rows", [])):
        lines.append("  (hidden = 1 - (a - b)/c: a ring with transfers, b with local copies,"
                     " c shifts alone; means over ranks)")
    return lines


def nccl_table(rows: list[dict[str, Any]]) -> list[str]:
    """Allreduce rows (``BenchFile.allreduce`` columns) as nccl-tests prints them."""
    out = ["#       size         count      type   redop    root     time   algbw   busbw"
           " #wrong",
           "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)"]
    for r in rows:
        out.append(f"{int(r['size']):>12d}  {int(r['count']):>12d}  {r['type']:>8}"
                   f"  {r['redop']:>6}  {int(r['root']):>6d}  {r['time']:>7.2f}"
                   f"  {r['algbw']:>6.2f}  {r['busbw']:>6.2f}  {r['#wrong']:>5}")
    return out


def allreduce_csv(files: list[Loaded]) -> str:
    """The Allreduce tables of bench files as CSV: the nccl-tests columns (size B, count,
    type, redop, root, time us, algbw GB/s, busbw GB/s, #wrong), then spread (us),
    copy_time (us), copy_bw (GB/s), ranks and file; one row per file and message size.
    Floats are written in full (``repr``)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(ALLREDUCE_CSV)
    for rf in files:
        t = rf.bench.get("nccl")
        if t is None:
            continue
        for i in range(len(t["size"])):
            writer.writerow([_csv_value(t[c][i]) if c in t else "" for c in ALLREDUCE_CSV[:-1]]
                            + [rf.path])
    return text.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return "" if isinstance(value, float) and not np.isfinite(value) else value


def _head_table(title: str, values: np.ndarray) -> list[str]:
    """A (layer, head) array as text: one row per layer, one column per head."""
    lines = [f"  {title}, layer x head:",
             "  layer" + "".join(f"{h:>8}" for h in range(values.shape[1]))]
    for layer, row in enumerate(values):
        lines.append(f"  {layer:>5}" + "".join(f"{v:>8.3f}" for v in row))
    return lines


def format_scaling(sc: dict[str, Any]) -> str:
    lines = ["strong scaling (forward time = max over ranks of /timings/forward):"]
    if not sc["same_model"]:
        lines.append("  WARNING: the files do not describe the same model and input;"
                     " the speed-ups below compare different work:")
        lines += [f"    {d}" for d in sc["differences"]]
    lines.append(f"  {'ranks':>6} {'DxT':>7} {'forward s':>11} {'speed-up':>9} {'efficiency':>11}")
    for r in sc["rows"]:
        lines.append(f"  {r['ranks']:>6} {r['layout']:>7} {r['forward_s']:>11.4f}"
                     f" {r['speedup']:>9.2f} {r['efficiency']:>11.2f}")
    if sc["repeated"]:
        lines.append(f"  ({sc['repeated']} file(s) at a repeated rank count: the fastest is shown)")
    return "\n".join(lines)


def plot_target(name: str) -> outfile.Reservation:
    """The PNG file ``--plot NAME`` will create, checked before any work: ``.png`` added to
    a name without a suffix (what the user is told is the real name), any other suffix
    refused, an existing name (or one that is not a regular file) refused, the folder
    checked by ``outfile.Reservation.make`` (exists, takes a new regular file). One-line
    InputError otherwise (exit 2 in the CLI)."""
    given = Path(name)
    if given.exists() and not given.is_file():
        raise InputError(f"--plot '{name}' is not a regular file: give a new file name"
                         " ending in .png")
    if given.name and not given.suffix and not name.endswith(("/", ".")):
        given = given.with_name(given.name + ".png")
    elif given.suffix.lower() != ".png":
        raise InputError(f"--plot '{name}': plots are written as PNG: give a file name ending"
                         " in .png")
    if given.exists() or given.is_symlink():
        raise InputError(f"'{given}' exists: choose another --plot name or remove it")
    try:
        return outfile.Reservation.make(given, force=False)
    except UserError as err:
        raise InputError(f"--plot '{given}': "
                         + str(err).replace("-o NEW.h5", "another --plot name")
                         .replace(" -o", " --plot")) from None


def plot(files: list[Loaded], sc: dict[str, Any] | None,
         out: outfile.Reservation | str, heads: bool = False) -> Path:
    """Render the figures to PNG bytes and publish them under ``out`` (an exclusive
    temporary renamed without replacing anything); the file's name. ``heads``: the
    per-head statistics heatmaps instead of the phase, scaling and loss panels."""
    out = out if isinstance(out, outfile.Reservation) else plot_target(str(out))
    try:
        return _plot_heads(files, out) if heads else _plot(files, sc, out)
    finally:
        out.discard()


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; InputError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'mpiattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_heads(files: list[Loaded], out: outfile.Reservation) -> Path:
    """One row per file: mean attention entropy and distance as layer x head heatmaps."""
    plt = _pyplot()
    rows = [rf for rf in files if rf.heads]
    if not rows:
        raise InputError("nothing to plot: no /heads/entropy in these files (run with"
                         " output.head_stats = true)")
    layers = max(rf.heads["entropy"].shape[0] for rf in rows)
    heads = max(rf.heads["entropy"].shape[1] for rf in rows)
    size = (2 * (1.6 + 0.45 * heads), 0.9 + 0.4 * layers)
    fig, axes = plt.subplots(len(rows), 2, squeeze=False,
                             figsize=(max(8.0, size[0]), max(3.2, size[1]) * len(rows)))
    for row, rf in zip(axes, rows, strict=True):
        for ax, (name, units, cmap) in zip(row, (("entropy", "nats", "viridis"),
                                                 ("distance", "tokens", "magma")), strict=True):
            values = rf.heads[name]
            image = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest")
            fig.colorbar(image, ax=ax, label=f"{name} [{units}]")
            ax.set_xticks(np.arange(values.shape[1]))
            ax.set_yticks(np.arange(values.shape[0]))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"mean attention {name}, {Path(rf.path).name}", fontsize="medium")
    return _publish(plt, fig, out)


def _publish(plt: Any, fig: Any, out: outfile.Reservation) -> Path:
    """The figure as PNG bytes, published under ``out`` without replacing anything."""
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    try:
        out.write(image.getbuffer())
    except OSError as err:
        raise InputError(f"cannot write '{out.path}': {os.strerror(err.errno or 0)}; choose"
                         " another --plot name") from None
    try:
        return out.publish(replace=False)
    except outfile.OutputExists:
        raise InputError(f"'{out.path}' was created by someone else meanwhile: choose another"
                         " --plot name or remove it") from None


def _plot(files: list[Loaded], sc: dict[str, Any] | None, out: outfile.Reservation) -> Path:
    """One panel per kind of measurement, never unlike ones on one axis: time per phase of
    run files (summed over layers) and, separately, of training files (over steps) and of
    bench files (one layer); strong scaling; training loss; Allreduce bus bandwidth."""
    plt = _pyplot()
    groups: dict[str, list[Loaded]] = {}
    for rf in files:  # by the timing axis' dimension label: layer, step, bench's one layer
        if rf.seconds is not None:
            groups.setdefault(f"{rf.axis}s", []).append(rf)
        elif "phase_seconds" in rf.bench:
            groups.setdefault("one layer", []).append(rf)
    panels: list[tuple[str, Any]] = [("phases", (over, sorted(g, key=lambda r: r.world_size)))
                                     for over, g in groups.items()]
    panels += [("scaling", None)] if sc and len(sc["rows"]) > 1 else []
    trained = [rf for rf in files if "loss" in rf.train]
    panels += [("loss", trained)] if trained else []
    benched = [rf for rf in files if "nccl" in rf.bench]
    panels += [("allreduce", benched)] if benched else []
    if not panels:
        raise InputError("nothing to plot: no /timings, /train or /bench in these files")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (panel, data) in zip(axes[0], panels, strict=True):
        if panel == "phases":
            _phase_panel(ax, *data)
        elif panel == "scaling":
            assert sc is not None
            n = np.array([r["ranks"] for r in sc["rows"]], dtype=float)
            ax.plot(n, [r["speedup"] for r in sc["rows"]], "o-", label="measured")
            ax.plot(n, n / n[0], "k--", label="ideal")
            ax.set_xscale("log", base=2)
            ax.set_xticks(n, [str(int(v)) for v in n])
            ax.set_xlabel("ranks")
            ax.set_ylabel(f"speed-up vs {int(n[0])} rank(s) [×]")
            ax.set_title("strong scaling" + ("" if sc["same_model"] else " (DIFFERENT models)"))
            ax.legend(fontsize="small")
        elif panel == "loss":
            for rf in data:
                loss = rf.train["loss"]
                steps = rf.train.get("step")
                steps = steps if steps is not None and steps.size == loss.size else np.arange(
                    1, loss.size + 1)
                name = Path(rf.path).name
                ax.plot(steps, loss, label=f"{name} train")
                ev, es = rf.train.get("eval_loss"), rf.train.get("eval_step")
                if ev is not None and es is not None and ev.size == es.size:
                    ax.plot(es, ev, "o--", label=f"{name} eval")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss [nats per masked token]")
            ax.set_title("training loss")
            ax.legend(fontsize="small")
        else:
            for rf in data:
                t = rf.bench["nccl"]
                name = f"{Path(rf.path).name} ({int(t['ranks'][0])} ranks)"
                line = ax.plot(t["size"], t["busbw"], "o-", label=f"{name} busbw")[0]
                if "copy_bw" in t:
                    ax.plot(t["size"], t["copy_bw"], ":", color=line.get_color(),
                            label=f"{name} memory copy")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("message size [B]")
            ax.set_ylabel("bandwidth [GB/s]")
            ax.set_title("Allreduce bus bandwidth (bench)")
            ax.legend(fontsize="small")
    return _publish(plt, fig, out)


def _phase_panel(ax: Any, over: str, group: list[Loaded]) -> None:
    """Stacked time per phase, one bar per file, of files timed over the same axis."""
    x = np.arange(len(group))
    per_file = [(rf.seconds.sum(axis=1), rf.phases) if rf.seconds is not None else
                (rf.bench["phase_seconds"], rf.bench["phases"]) for rf in group]
    names = list(dict.fromkeys(n for _, phases in per_file for n in phases))
    bottom = np.zeros(len(group))
    for name in names:
        h = np.array([per.mean(axis=0)[phases.index(name)] if name in phases else 0.0
                      for per, phases in per_file])
        ax.bar(x, h, bottom=bottom, label=name)
        bottom += h
    kinds = "/".join(dict.fromkeys(rf.kind for rf in group))
    ax.set_xticks(x, [f"{rf.world_size}" for rf in group])
    ax.set_xlabel("ranks (one bar per file)")
    over = {"session_steps": "steps"}.get(over, over)  # format 2's name of a run's steps
    ax.set_ylabel("time per rank, " + (f"summed over {over}" if over != "one layer" else
                                       "one layer") + " [s]")
    ax.set_title(f"{kinds}: time per phase (mean over ranks)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _checked_summary(rf: Loaded, heads: bool = False) -> tuple[dict[str, Any], str]:
    """``summarize`` and ``format_summary`` of one file; what they raise on values of the
    wrong kind (a malformed file) becomes one ``InputError`` line naming the file."""
    try:
        s = summarize(rf, heads)
        return s, format_summary(s)
    except h5safe.MALFORMED as err:
        raise malformed(rf.path, err) from None


def plain(value: Any) -> Any:
    """``value`` with NumPy types as Python ones, non-finite floats as None (JSON has no
    NaN) and anything else JSON cannot hold (TOML dates) as its string."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def report(paths: list[str], as_json: bool = False, plot_to: str | None = None,
           heads: bool = False, as_csv: bool = False) -> int:
    """Print the summary of each file (and the scaling table of several run files), as
    text or JSON (non-finite numbers as null; per rank what the tables aggregate); 0 on
    success. ``as_csv``: the Allreduce tables of bench files as CSV instead
    (``allreduce_csv``; every file must hold /bench/allreduce). ``heads``: with the
    per-head statistics as (layer, head) tables, and ``plot_to`` draws them as heatmaps;
    every file must hold /heads/entropy then. A missing, hostile or malformed file raises
    one ``InputError`` line naming it (exit code 2 in the CLI)."""
    target = plot_target(plot_to) if plot_to else None  # before any work
    files = [load(p) for p in paths]
    if heads:
        for rf in files:
            if "entropy" not in rf.heads:
                raise InputError(f"'{rf.path}' has no /heads/entropy: --heads reads files of"
                                 " `mpiattn run --set output.head_stats=true`")
    if as_csv:
        for rf in files:
            if "nccl" not in rf.bench:
                raise InputError(f"'{rf.path}' holds no /bench/allreduce: --csv writes the"
                                 " Allreduce table of `mpiattn bench` files")
    checked = [_checked_summary(rf, heads) for rf in files]
    sc = scaling(files) if len(files) > 1 else None
    if sc is not None and len(sc["rows"]) < 2:
        sc = None  # fewer than two timed run files: nothing to compare
    if target is not None:
        plot_to = str(plot(files, sc, target, heads))
    if as_csv:
        sys.stdout.write(allreduce_csv(files))
        if plot_to:
            print(f"wrote {plot_to}", file=sys.stderr)
        return 0
    if as_json:
        summaries = [s for s, _ in checked]
        print(json.dumps(plain({"files": summaries, "scaling": sc, "plot": plot_to}),
                         indent=2, allow_nan=False))
        return 0
    print("\n\n".join(text for _, text in checked))
    if sc is not None:
        print()
        print(format_scaling(sc))
    if plot_to:
        print(f"wrote {plot_to}")
    return 0

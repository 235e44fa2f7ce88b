"""``mpiattn report``: tables, JSON and plots from finished HDF5 files, offline.

    mpiattn report run.h5                       # per-phase table, partition, checksums
    mpiattn report s1.h5 s2.h5 s4.h5 --plot scaling.png    # + strong scaling
    mpiattn report run.h5 --json

Needs only h5py and NumPy (no MPI, no SciPy); matplotlib only for ``--plot``. Reads any
format version it finds and skips the groups a file does not have (older files, bench
files, training files), so one command reads them all.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from .errors import InputError

KNOWN_FORMAT = 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _scalar(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (JSON-ready)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_scalar(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class RunFile:
    """What the analysis needs from one file; absent parts stay None / empty."""

    path: str
    format_version: int
    command: str
    config: dict  # the parsed `config` TOML ({} when missing or unreadable)
    world_size: int
    tensor_parallel: int
    data_parallel: int
    head_partition: list[int]
    attrs: dict  # the other root attributes, as plain values
    phases: list[str] = field(default_factory=list)
    seconds: np.ndarray | None = None  # (rank, layer, phase)
    forward: np.ndarray | None = None  # (rank,)
    setup: np.ndarray | None = None
    total: np.ndarray | None = None
    hosts: list[str] = field(default_factory=list)
    collectives: np.ndarray | None = None
    train: dict[str, np.ndarray] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> dict:
        return self.config.get("model", {})

    @property
    def input(self) -> dict:
        return self.config.get("input", {})

    @property
    def forward_s(self) -> float | None:
        """What a strong-scaling table compares: the slowest rank's forward time."""
        return float(self.forward.max()) if self.forward is not None else None


def _dataset(f: Any, name: str) -> np.ndarray | None:
    return f[name][()] if name in f and hasattr(f[name], "shape") else None


def load(path: str | Path) -> RunFile:
    """Read one file written by mpiattn (run, train or bench), tolerating missing parts."""
    from .h5io import open_for_reading

    with open_for_reading(path) as f:
        attrs = {k: _scalar(v) for k, v in f.attrs.items()}
        try:
            cfg = tomllib.loads(_text(attrs.pop("config", "")))
        except tomllib.TOMLDecodeError:
            cfg = {}
        version = int(attrs.get("format_version", 0) or 0)
        world = int(attrs.get("world_size", 0) or 0)
        parts = attrs.get("head_partition")
        parts = [int(x) for x in parts] if isinstance(parts, list) else (
            [int(parts)] if parts is not None else [])
        rf = RunFile(
            path=str(path), format_version=version, command=_text(attrs.get("command", "")),
            config=cfg, world_size=world,
            tensor_parallel=int(attrs.get("tensor_parallel", world) or world),
            data_parallel=int(attrs.get("data_parallel", 1) or 1),
            head_partition=parts, attrs=attrs,
        )
        if "timings/seconds" in f:
            d = f["timings/seconds"]
            sec = np.asarray(d[()], dtype=float)
            if sec.ndim == 2:  # (rank, phase): no layer axis
                sec = sec[:, None, :]
            rf.seconds = sec
            names = d.attrs.get("phases")
            rf.phases = ([_text(x) for x in names] if names is not None
                         else [f"phase{i}" for i in range(sec.shape[-1])])
        for name in ("forward", "setup", "total"):
            value = _dataset(f, f"timings/{name}")
            if value is not None:
                setattr(rf, name, np.atleast_1d(np.asarray(value, dtype=float)))
        hosts = _dataset(f, "ranks/host")
        if hosts is not None:
            rf.hosts = [_text(h) for h in np.atleast_1d(hosts)]
        rf.collectives = _dataset(f, "checksum/collectives")
        if "train" in f:
            for name in ("loss", "eval_loss", "eval_step", "step", "tokens_per_second", "lr"):
                value = _dataset(f, f"train/{name}")
                if value is not None:
                    rf.train[name] = np.atleast_1d(np.asarray(value, dtype=float))
        if "bench" in f:
            rf.bench = _read_bench(f["bench"])
    if version > KNOWN_FORMAT:
        print(f"mpiattn report: note: {path} has format_version {version} (this reader knows"
              f" {KNOWN_FORMAT}); reading what it recognises", file=sys.stderr)
    return rf


def _read_bench(g: Any) -> dict[str, Any]:
    """/bench/allreduce (bytes, seconds, ranks) and /bench/gemm/flops_per_second."""
    out: dict[str, Any] = {}
    if "allreduce" in g and "bytes" in g["allreduce"] and "seconds" in g["allreduce"]:
        ar = g["allreduce"]
        nbytes = np.atleast_1d(ar["bytes"][()]).astype(float)
        seconds = np.atleast_1d(ar["seconds"][()]).astype(float)
        if "ranks" in ar:
            ranks = np.atleast_1d(ar["ranks"][()]).astype(float)
        else:
            ranks = np.array([float(ar.attrs.get("ranks", 1))])
        out["allreduce"] = {"bytes": nbytes, "seconds": seconds,
                            "ranks": np.broadcast_to(ranks, nbytes.shape).copy()}
    if "gemm" in g and "flops_per_second" in g["gemm"]:
        out["gemm_flops_per_second"] = np.atleast_1d(g["gemm/flops_per_second"][()]).astype(float)
    if "phases" in g and "seconds" in g["phases"]:  # (rank, phase), one layer
        d = g["phases/seconds"]
        out["phase_seconds"] = np.atleast_2d(d[()]).astype(float)
        out["phases"] = [_text(x) for x in d.attrs.get("phases", [])]
    out["checksum_mode"] = _text(g.attrs.get("checksum_mode", ""))
    return out


# --- one file ---------------------------------------------------------------------------

def phase_table(rf: RunFile) -> dict[str, dict[str, float]] | None:
    """Per phase: mean over ranks of the per-rank sum over layers, max, max/mean."""
    if rf.seconds is None:
        return None
    per_rank = rf.seconds.sum(axis=1)  # (rank, phase)
    table = {}
    for i, name in enumerate(rf.phases):
        mean, top = float(per_rank[:, i].mean()), float(per_rank[:, i].max())
        table[name] = {"mean_s": mean, "max_s": top,
                       "imbalance": top / mean if mean > 0 else 1.0}
    return table


def checksum_summary(rf: RunFile) -> dict[str, Any] | None:
    t = rf.collectives
    if t is None or t.dtype.names is None:
        return None
    names = t.dtype.names
    out: dict[str, Any] = {"count": len(t)}
    if "passed" in names:
        out["passed"] = int(np.asarray(t["passed"]).astype(bool).sum())
    if "ratio" in names and len(t):
        out["max_ratio"] = float(np.max(t["ratio"]))
    if "retries" in names:
        out["retries"] = int(np.sum(t["retries"]))
    return out


def train_summary(rf: RunFile) -> dict[str, Any] | None:
    if not rf.train:
        return None
    out: dict[str, Any] = {}
    loss = rf.train.get("loss")
    if loss is not None and loss.size:
        out.update(steps=int(loss.size), first_loss=float(loss[0]), last_loss=float(loss[-1]),
                   min_loss=float(np.nanmin(loss)))
    ev = rf.train.get("eval_loss")
    if ev is not None and ev.size:
        out["last_eval_loss"] = float(ev[-1])
        steps = rf.train.get("eval_step")
        if steps is not None and steps.size == ev.size:
            out["last_eval_step"] = int(steps[-1])
    tps = rf.train.get("tokens_per_second")
    if tps is not None and tps.size:
        out["tokens_per_second_mean"] = float(np.nanmean(tps))
    return out


def summarize(rf: RunFile) -> dict[str, Any]:
    m = rf.model
    out: dict[str, Any] = {
        "path": rf.path, "format_version": rf.format_version, "command": rf.command,
        "status": rf.attrs.get("status"), "world_size": rf.world_size,
        "tensor_parallel": rf.tensor_parallel, "data_parallel": rf.data_parallel,
        "head_partition": rf.head_partition, "backend": rf.attrs.get("backend"),
        "dtype": rf.config.get("dtype"),
        "model": {k: m[k] for k in ("layers", "heads", "hidden", "ffn") if k in m},
        "input": {k: rf.input[k] for k in ("batch", "seq_len") if k in rf.input},
    }
    for name in ("forward", "setup", "total"):
        value = getattr(rf, name)
        if value is not None:
            out[f"{name}_s"] = float(value.max())
    if rf.seconds is not None and rf.seconds.shape[1] >= 3 and rf.command != "train":
        layer = rf.seconds.sum(axis=2)  # (rank, layer); training files: (rank, step)
        extra = float(np.max(layer[:, 0] - np.median(layer[:, 1:], axis=1)))
        out["first_layer_extra_s"] = extra
    for key, fn in (("phases", phase_table), ("checksum", checksum_summary),
                    ("train", train_summary)):
        value = fn(rf)
        if value is not None:
            out[key] = value
    return out


# --- several files ------------------------------------------------------------------------

def same_model(files: list[RunFile]) -> list[str]:
    """Differences in [model], [input] (and dtype) between the first file and the others."""
    problems = []
    ref = files[0]
    for rf in files[1:]:
        for section in ("model", "input"):
            a, b = ref.config.get(section), rf.config.get(section)
            if a is None or b is None:
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


def scaling(files: list[RunFile]) -> dict[str, Any]:
    """Strong scaling: per rank count the best forward time, speed-up and efficiency."""
    timed = [rf for rf in files if rf.forward_s is not None and rf.world_size > 0]
    best: dict[int, RunFile] = {}
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
    return {"same_model": not same_model(files), "differences": same_model(files),
            "rows": rows, "repeated": len(timed) - len(best)}


# --- output -----------------------------------------------------------------------------

def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['path']}: {s['command'] or '?'} (format {s['format_version']}),"
             f" status {s['status'] or '?'}"]
    m, i = s["model"], s["input"]
    if m:
        lines.append(f"  model     {m.get('layers', '?')} layers, {m.get('heads', '?')} heads,"
                     f" hidden {m.get('hidden', '?')}, ffn {m.get('ffn', '?')};"
                     f" batch {i.get('batch', '?')} x seq {i.get('seq_len', '?')},"
                     f" {s.get('dtype') or '?'}, {s.get('backend') or '?'}")
    lines.append(f"  ranks     {s['world_size']} = {s['data_parallel']} data x"
                 f" {s['tensor_parallel']} head; heads per rank {s['head_partition']}")
    times = [f"{k} {s[f'{k}_s']:.4f} s" for k in ("forward", "setup", "total") if f"{k}_s" in s]
    if times:
        lines.append("  time      " + ", ".join(times) + " (max over ranks)")
    phases = s.get("phases")
    if phases:
        total = sum(v["mean_s"] for v in phases.values()) or 1.0
        lines.append(f"  {'phase':<12}{'mean s':>10}{'max s':>10}{'imbalance':>11}{'share':>8}")
        for name, v in phases.items():
            lines.append(f"  {name:<12}{v['mean_s']:>10.4f}{v['max_s']:>10.4f}"
                         f"{v['imbalance']:>11.3f}{100 * v['mean_s'] / total:>7.1f}%")
        axis = "steps" if s["command"] == "train" else "layers"
        lines.append(f"  (mean over ranks of the per-rank sum over {axis}; imbalance = max/mean)")
        extra = s.get("first_layer_extra_s", 0.0)
        if extra > 0.2 * total / max(1, m.get("layers", 1)):
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
    return "\n".join(lines)


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


def plot(files: list[RunFile], sc: dict[str, Any] | None, out: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'mpiattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = sorted((rf for rf in files if rf.seconds is not None), key=lambda r: r.world_size)
    trained = [rf for rf in files if "loss" in rf.train]
    panels = (["phases"] if timed else []) + (["scaling"] if sc and len(sc["rows"]) > 1 else [])
    panels += ["loss"] if trained else []
    if not panels:
        raise InputError("nothing to plot: no /timings or /train in these files")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "phases":
            labels = [f"{rf.world_size}" for rf in timed]
            x = np.arange(len(timed))
            names = list(dict.fromkeys(n for rf in timed for n in rf.phases))
            bottom = np.zeros(len(timed))
            for name in names:
                h = np.array([rf.seconds.sum(axis=1).mean(axis=0)[rf.phases.index(name)]
                              if name in rf.phases else 0.0 for rf in timed])
                ax.bar(x, h, bottom=bottom, label=name)
                bottom += h
            ax.set_xticks(x, labels)
            ax.set_xlabel("ranks (one bar per file)")
            ax.set_ylabel("time per rank, summed over layers [s]")
            ax.set_title("time per phase (mean over ranks)")
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
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
        else:
            for rf in trained:
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
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def report(paths: list[str], as_json: bool = False, plot_to: str | None = None) -> int:
    files = [load(p) for p in paths]
    summaries = [summarize(rf) for rf in files]
    sc = scaling(files) if len(files) > 1 else None
    if plot_to:
        plot(files, sc, plot_to)
    if as_json:
        print(json.dumps({"files": summaries, "scaling": sc, "plot": plot_to}, indent=2,
                         default=float))
        return 0
    print("\n\n".join(format_summary(s) for s in summaries))
    if sc is not None:
        print()
        print(format_scaling(sc))
    if plot_to:
        print(f"wrote {plot_to}")
    return 0

"""``mpiattn report``: tables, JSON and plots from finished HDF5 files, offline.

    mpiattn report run.h5                       # per-phase table, partition, checksums
    mpiattn report s1.h5 s2.h5 s4.h5 --plot scaling.png    # + strong scaling
    mpiattn report run.h5 --json
    mpiattn report --heads run.h5 --plot heads.png   # per-head entropy/distance heatmaps

Needs only h5py and NumPy (no MPI, no SciPy); matplotlib only for ``--plot``. Reads any
format version it finds and skips the groups a file does not have (older files, bench
files, training files), so one command reads them all. Files are read through ``h5safe``:
only bytes inside the file, bounded reads, UTF-8 text; a file that is hostile or malformed
(wrong types, shapes or dtypes, a `config` attribute over 1 MiB) is one error line naming
it (exit code 2 in the CLI), never a traceback. Non-finite numbers are shown (``nan``) and
written as ``null`` in ``--json``; ``mpiattn verify`` is what fails such a file.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import h5safe, outfile
from .errors import InputError, UserError

KNOWN_FORMAT = 2  # 2 added dimension scales; what report reads is alike in 1 and 2
MAX_CONFIG_BYTES = 2**20  # the `config` attribute (a few KiB of TOML when mpiattn wrote it)
MAX_READ_BYTES = 2**30  # one dataset read by report (timings, hosts, records, histories)


def _scalar(value: Any, where: str) -> Any:
    """An HDF5 attribute as a plain Python value (JSON-ready); text must be UTF-8."""
    if isinstance(value, (bytes, str)):
        return h5safe.text(value, where)
    if isinstance(value, np.ndarray):
        return [_scalar(v, where) for v in value.ravel()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _int(value: Any, where: str, default: int) -> int:
    """An integer attribute (``default`` when absent, 0 or empty); InputError otherwise."""
    if value is None or value == 0 or value == "":
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and float(value).is_integer():
        return int(value)
    raise InputError(f"{where} is {h5safe.short(value)}, not an integer: {h5safe.NOT_OURS}")


def malformed(path: str | Path, err: BaseException) -> InputError:
    """The one line for a file that h5py or NumPy could not read the way report needs."""
    return InputError(f"'{path}': not a readable mpiattn file ({type(err).__name__}:"
                      f" {h5safe.one_line(err)}); `mpiattn verify {path}` checks it")


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


def _dataset(f: Any, name: str) -> np.ndarray | None:
    """Dataset ``name`` read within the bounds of ``h5safe.read`` (None when absent)."""
    return h5safe.read(f[name], MAX_READ_BYTES) if name in f else None


def _numbers(f: Any, name: str, ndim: tuple[int, ...] = (0, 1)) -> np.ndarray | None:
    """A numeric dataset as float64, at least 1-D (None when absent); InputError when it
    holds no numbers or has a number of dimensions outside ``ndim``."""
    value = _dataset(f, name)
    if value is None:
        return None
    where = f"{f.name.rstrip('/')}/{name}"
    if value.dtype.kind not in "biuf":
        raise InputError(f"{where} has dtype {value.dtype}: expected numbers")
    if value.ndim not in ndim:
        raise InputError(f"{where} has shape {value.shape}: expected {max(ndim)} dimension(s)")
    return np.atleast_1d(value.astype(float))


def _parse_config(raw: str) -> dict:
    """The `config` TOML as a dict; {} when it is not TOML (an older or foreign file)."""
    try:
        return tomllib.loads(raw)
    except (tomllib.TOMLDecodeError, RecursionError):
        return {}


def load(path: str | Path) -> RunFile:
    """Read one file written by mpiattn (run, train or bench), tolerating missing parts.

    Only the file's own bytes are read, within bounds (``h5safe``). A missing, hostile or
    malformed file raises one ``InputError`` line naming ``path``.
    """
    with h5safe.open_for_reading(path) as f:
        try:
            rf = _read(f, str(path))
        except InputError as err:
            raise InputError(f"'{path}': {err}") from None
        except h5safe.MALFORMED as err:
            raise malformed(path, err) from None
    if rf.format_version > KNOWN_FORMAT:
        print(f"mpiattn report: note: {path} has format_version {rf.format_version} (this"
              f" reader knows {KNOWN_FORMAT}); reading what it recognises", file=sys.stderr)
    return rf


def _read(f: Any, path: str) -> RunFile:
    rf = _root(f, path)
    _read_timings(f, rf)
    hosts = _dataset(f, "ranks/host")
    if hosts is not None:
        rf.hosts = [h5safe.text(h, "an element of /ranks/host") for h in hosts.ravel()]
    rf.collectives = _dataset(f, "checksum/collectives")
    if "train" in f:
        for name in ("loss", "eval_loss", "eval_step", "step", "tokens_per_second", "lr"):
            value = _numbers(f, f"train/{name}")
            if value is not None:
                rf.train[name] = value
    if "bench" in f:
        rf.bench = _read_bench(f["bench"])
    if "heads" in f:
        _read_heads(f, rf)
    return rf


def _read_heads(f: Any, rf: RunFile) -> None:
    """/heads/entropy and /heads/distance (layer, head), the query-token count, and the
    shape of /heads/maps (the maps themselves are not read)."""
    for name in ("entropy", "distance"):
        value = _numbers(f, f"heads/{name}", ndim=(2,))
        if value is not None and 0 in value.shape:
            raise InputError(f"/heads/{name} has shape {value.shape}: it holds no heads")
        if value is not None:
            rf.heads[name] = value
    if len({v.shape for v in rf.heads.values()}) > 1:
        raise InputError(f"/heads/entropy has shape {rf.heads['entropy'].shape} but"
                         f" /heads/distance {rf.heads['distance'].shape}")
    tokens = h5safe.attr(f["heads"], "query_tokens")
    if tokens is not None:
        rf.head_attrs["query_tokens"] = _int(_scalar(tokens, "attribute 'query_tokens'"),
                                             "attribute 'query_tokens' of /heads", 0)
    maps = f.get("heads/maps")
    if maps is not None and hasattr(maps, "shape"):
        rf.head_attrs["maps_shape"] = [int(n) for n in maps.shape]


def _root(f: Any, path: str) -> RunFile:
    """Root attributes, the `config` TOML bounded to ``MAX_CONFIG_BYTES``."""
    raw = h5safe.attr(f, "config", "", max_bytes=MAX_CONFIG_BYTES)
    cfg = _parse_config(h5safe.text(raw, "attribute 'config' of /"))
    attrs = {k: _scalar(h5safe.attr(f, k), f"attribute '{k}' of /") for k in f.attrs
             if k != "config"}
    version = _int(attrs.get("format_version"), "attribute 'format_version' of /", 0)
    world = _int(attrs.get("world_size"), "attribute 'world_size' of /", 0)
    parts = attrs.get("head_partition")
    parts = parts if isinstance(parts, list) else [] if parts is None else [parts]
    if "status" in attrs:  # as verify reads it: text, or the file is not ours
        attrs["status"] = h5safe.text(attrs["status"], "attribute 'status' of /")
    return RunFile(
        path=path, format_version=version,
        command=h5safe.text(attrs.get("command", ""), "attribute 'command' of /"),
        config=cfg, world_size=world,
        tensor_parallel=_int(attrs.get("tensor_parallel"), "attribute 'tensor_parallel'"
                             " of /", world),
        data_parallel=_int(attrs.get("data_parallel"), "attribute 'data_parallel' of /", 1),
        head_partition=[_int(x, "attribute 'head_partition' of /", 0) for x in parts],
        attrs=attrs,
    )


def _read_timings(f: Any, rf: RunFile) -> None:
    """/timings/seconds (rank, layer, phase) with its `phases` names, and the per-rank
    forward/setup/total times; InputError when their shapes do not fit together."""
    sec = _numbers(f, "timings/seconds", ndim=(2, 3))
    if sec is not None:
        sec = sec[:, None, :] if sec.ndim == 2 else sec  # (rank, phase): no layer axis
        if 0 in sec.shape:
            raise InputError(f"/timings/seconds has shape {sec.shape}: it holds no times")
        names = h5safe.attr(f["timings/seconds"], "phases")
        rf.phases = ([h5safe.text(x, "attribute 'phases' of /timings/seconds")
                      for x in np.atleast_1d(names).ravel()] if names is not None
                     else [f"phase{i}" for i in range(sec.shape[-1])])
        if len(rf.phases) != sec.shape[-1]:
            raise InputError(f"/timings/seconds has {sec.shape[-1]} phases but its 'phases'"
                             f" attribute names {len(rf.phases)}")
        rf.seconds = sec
    for name in ("forward", "setup", "total"):
        value = _numbers(f, f"timings/{name}")
        if value is not None and value.size:
            setattr(rf, name, value)


def _read_bench(g: Any) -> dict[str, Any]:
    """/bench/allreduce (bytes, seconds, ranks) and /bench/gemm/flops_per_second."""
    out: dict[str, Any] = {}
    if "allreduce" in g and "bytes" in g["allreduce"] and "seconds" in g["allreduce"]:
        nbytes = _numbers(g, "allreduce/bytes")
        seconds = _numbers(g, "allreduce/seconds")
        if "ranks" in g["allreduce"]:
            ranks = _numbers(g, "allreduce/ranks")
        else:
            ranks = np.array([float(h5safe.attr(g["allreduce"], "ranks", 1))])
        out["allreduce"] = {"bytes": nbytes, "seconds": seconds,
                            "ranks": np.broadcast_to(ranks, nbytes.shape).copy()}
    if "gemm" in g and "flops_per_second" in g["gemm"]:
        out["gemm_flops_per_second"] = _numbers(g, "gemm/flops_per_second")
    if "phases" in g and "seconds" in g["phases"]:  # (rank, phase), one layer
        out["phase_seconds"] = np.atleast_2d(_numbers(g, "phases/seconds", ndim=(0, 1, 2)))
        out["phases"] = [h5safe.text(x, "attribute 'phases' of /bench/phases/seconds")
                         for x in np.atleast_1d(h5safe.attr(g["phases/seconds"], "phases",
                                                            [])).ravel()]
    out["checksum_mode"] = h5safe.text(h5safe.attr(g, "checksum_mode", ""),
                                       "attribute 'checksum_mode' of /bench")
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


def heads_summary(rf: RunFile, tables: bool = False) -> dict[str, Any] | None:
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


def summarize(rf: RunFile, heads: bool = False) -> dict[str, Any]:
    """One file's summary; ``heads``: with the (layer, head) statistics tables."""
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
    if rf.command == "run" and "lines" in rf.attrs:  # a streamed text run (ragged rows)
        out["input"] = {"lines": _int(rf.attrs.get("lines"), "attribute 'lines'", 0),
                        "tokens": _int(rf.attrs.get("tokens"), "attribute 'tokens'", 0),
                        "micro_batch": rf.input.get("batch", "?")}
    for name in ("forward", "setup", "total"):
        value = getattr(rf, name)
        if value is not None:
            out[f"{name}_s"] = float(value.max())
    if rf.seconds is not None and rf.seconds.shape[1] >= 3 and rf.command != "train":
        layer = rf.seconds.sum(axis=2)  # (rank, layer); training files: (rank, step)
        extra = float(np.max(layer[:, 0] - np.median(layer[:, 1:], axis=1)))
        out["first_layer_extra_s"] = extra
    for key, fn in (("phases", phase_table), ("checksum", checksum_summary),
                    ("train", train_summary),
                    ("heads", lambda r: heads_summary(r, tables=heads))):
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
                     + (f" {i['lines']} lines, {i['tokens']} tokens in micro-batches of"
                        f" {i['micro_batch']}," if "lines" in i else
                        f" batch {i.get('batch', '?')} x seq {i.get('seq_len', '?')},")
                     + f" {s.get('dtype') or '?'}, {s.get('backend') or '?'}")
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


def plot(files: list[RunFile], sc: dict[str, Any] | None,
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


def _plot_heads(files: list[RunFile], out: outfile.Reservation) -> Path:
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


def _plot(files: list[RunFile], sc: dict[str, Any] | None, out: outfile.Reservation) -> Path:
    plt = _pyplot()

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
    return _publish(plt, fig, out)


def _checked_summary(rf: RunFile, heads: bool = False) -> tuple[dict[str, Any], str]:
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
           heads: bool = False) -> int:
    """Print the summary of each file (and the scaling table of several), as text or JSON
    (non-finite numbers as null); 0 on success. ``heads``: with the per-head statistics
    as (layer, head) tables, and ``plot_to`` draws them as heatmaps; every file must hold
    /heads/entropy then. A missing, hostile or malformed file raises one ``InputError``
    line naming it (exit code 2 in the CLI)."""
    target = plot_target(plot_to) if plot_to else None  # before any work
    files = [load(p) for p in paths]
    if heads:
        for rf in files:
            if "entropy" not in rf.heads:
                raise InputError(f"'{rf.path}' has no /heads/entropy: --heads reads files of"
                                 " `mpiattn run --set output.head_stats=true`")
    checked = [_checked_summary(rf, heads) for rf in files]
    sc = scaling(files) if len(files) > 1 else None
    if target is not None:
        plot_to = str(plot(files, sc, target, heads))
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

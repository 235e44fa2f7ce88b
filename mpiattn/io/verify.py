"""``mpiattn verify``: whether a file is what it says it is. Every dataset's digest, the
run's promised contents, the named axes, the shared objects, and (for a checkpoint) every
tensor the model needs, read through the safe reader (``h5safe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .formats.checks import count_attr, rows
from .h5io import DIGEST_ATTR, open_for_reading


def verify(path: str | Path) -> list[str]:
    """Problems found in a finished file (empty when it is sound); no MPI needed.

    Checks: ``status == "complete"``; the ``config`` attribute, when present, is TOML of at
    most ``h5safe.MAX_ATTR_BYTES``; every dataset with a digest still matches it (streamed
    in blocks, so memory stays bounded; HDF5's fletcher32 also fails a read of a corrupted
    chunk); no NaN/inf in ``/layers/*``, ``/heads/*``, a checkpoint's ``/params/*`` and
    ``/optimizer/*`` (whose tensors must all be there, with the model's shapes),
    ``/output/pooled``, ``/train/loss``,
    ``/train/eval_loss``, ``/train/grad_norm``; every recorded collective passed; no
    object is reached under two names (hard links); everything the root attributes and the
    ``config`` promise is there (``_promised``: inputs, kept layers and pooled output with
    digests, per-head statistics and maps, Allreduce records, one timing row and host per
    ``world_size``).
    Raises ``InputError`` (one line) when the file cannot be opened safely
    (``h5safe.open_for_reading``); anything else wrong is a one-line problem in the list.
    """
    import tomllib

    from . import h5safe

    finite_checked = ("output/pooled", "train/loss", "train/eval_loss", "train/grad_norm")
    problems: list[str] = []
    with open_for_reading(path) as f:
        status = _root_text(f, "status", problems, "")
        if status is not None and status != "complete":
            problems.append(f"status is '{status or 'missing'}', not 'complete'")
        config = _root_text(f, "config", problems)
        if config is not None:
            try:
                config = tomllib.loads(config)
            except tomllib.TOMLDecodeError as err:
                problems.append(f"attribute 'config' of / is not TOML ({h5safe.one_line(err)})")
                config = None
        try:
            found_datasets = h5safe.datasets(f)
        except h5safe.MALFORMED as err:
            found_datasets = []
            problems.append(f"the file's objects cannot be listed ({h5safe.one_line(err)}):"
                            " corrupted")
        for name, dset in found_datasets:
            finite = name.startswith(("layers/", "heads/", "params/", "optimizer/")) \
                or name in finite_checked
            try:
                want = h5safe.attr(dset, DIGEST_ATTR)
                if want is None and not finite:
                    continue
                want = None if want is None else h5safe.text(want, f"/{name} attribute"
                                                             f" '{DIGEST_ATTR}'")
                found = h5safe.scan(dset, digest=want is not None, finite=finite)
            except InputError as err:
                problems.append(h5safe.one_line(err))
                continue
            except h5safe.MALFORMED as err:
                problems.append(f"dataset /{name} cannot be read ({h5safe.one_line(err)}):"
                                " corrupted")
                continue
            if want is not None and found.sha256 != want:
                problems.append(f"dataset /{name} does not match its sha256 digest")
            elif found.first_nonfinite is not None:
                at = found.first_nonfinite
                problems.append(f"non-finite values in /{name} (first at index"
                                f" {at[0] if len(at) == 1 else at})")
        if "checksum/collectives" in f:
            try:
                from .collectives import site_names

                table = np.atleast_1d(h5safe.read(f["checksum/collectives"]))
                failed = ~table["passed"].astype(bool)
                for row, raw in zip(table[failed], site_names(table)[failed], strict=True):
                    site = h5safe.text(raw, "a site in /checksum/collectives")
                    problems.append(f"collective replica {row['replica']} layer"
                                    f" {row['layer']} site '{site}' failed its checksum")
            except (*h5safe.MALFORMED, InputError) as err:
                problems.append(f"/checksum/collectives cannot be read"
                                f" ({h5safe.one_line(err)}): corrupted")
        try:  # a file sound so far is checked for what it lacks (no cascade of lines)
            problems += _shared_objects(f)
            if not problems:
                problems += _promised(f, config if isinstance(config, dict) else None)
        except InputError as err:
            problems.append(h5safe.one_line(err))
        except h5safe.MALFORMED as err:
            problems.append(f"the file's structure cannot be read ({h5safe.one_line(err)}):"
                            " corrupted")
        try:
            checkpoint = h5safe.attr(f, "command") == "train checkpoint"
        except (InputError, *h5safe.MALFORMED):
            checkpoint = False  # an unreadable root attribute: a problem found above
    if checkpoint and not problems:  # every tensor the model needs, with its shape
        from .formats.checkpoint import read_model

        try:
            read_model(path, with_params=False)
        except InputError as err:
            problems.append(h5safe.one_line(err))
    return problems


def _shared_objects(f: Any) -> list[str]:
    """Objects reached under more than one name (hard links): a dataset is written once,
    under one name; a second name makes one array pass for two. Dimension scales are not
    a second name: HDF5 attaches them by object references in attributes
    (``DIMENSION_LIST``, ``REFERENCE_LIST``), which are not links."""
    import h5py

    names: dict[tuple[int, int], list[str]] = {}
    root = h5py.h5o.get_info(f.id)
    names[(int(root.fileno), int(root.addr))] = ["/"]
    todo: list[tuple[str, Any]] = [("", f.id)]
    while todo:
        prefix, gid = todo.pop()
        for raw in gid:
            where = f"{prefix}/{raw.decode('utf-8', 'replace')}"
            oid = h5py.h5o.open(gid, raw)
            info = h5py.h5o.get_info(oid)
            seen = names.setdefault((int(info.fileno), int(info.addr)), [])
            seen.append(where)
            if len(seen) == 1 and isinstance(oid, h5py.h5g.GroupID):
                todo.append((where, oid))
    return [f"{' and '.join(sorted(where))} are one object under {len(where)} names (hard"
            " links): each dataset of an mpiattn file has one name; the file was altered"
            for where in names.values() if len(where) > 1]


def _root_text(f: Any, name: str, problems: list[str], default: Any = None) -> str | None:
    """Root attribute ``name`` as text (``default`` when absent); an unreadable or
    non-UTF-8 one is a problem line and None."""
    from . import h5safe

    try:
        value = h5safe.attr(f, name, default)
        return None if value is None else h5safe.text(value, f"attribute '{name}' of /")
    except InputError as err:
        problems.append(h5safe.one_line(err))
    except h5safe.MALFORMED as err:
        problems.append(f"attribute '{name}' of / cannot be read ({h5safe.one_line(err)}):"
                        " corrupted")
    return None


def _promised(f: Any, config: dict | None) -> list[str]:
    """What the root attributes and the ``config`` TOML promise is there (docs, "Files"):
    every file one timing row and one host per rank and axes that multiply to the world;
    then what its kind promises (``formats.PROMISES``: a run's inputs, kept layers, pooled
    output and records; a bench's measurements; a training history; a checkpoint's
    tensors). Files without a ``command`` and ``format_version`` (not
    written by a command) are not checked."""
    from . import h5safe

    command = h5safe.attr(f, "command")
    if command is None:
        return (["root attribute 'command' is missing: cannot tell what the file should hold"]
                if "format_version" in f.attrs else [])
    command = h5safe.text(command, "attribute 'command' of /")
    from .formats import PROMISES

    if command == "train checkpoint":  # parameters, optimizer state, history, vocabulary
        return PROMISES[command](f, config)
    if command not in ("run", "train", "bench"):
        return [f"root attribute 'command' is {command!r}, not run, train, bench or a"
                " train checkpoint"]
    problems: list[str] = []
    world = count_attr(f, "world_size", problems)
    if world is not None:  # run files always hold both; train and bench files, when timed
        for name in ("ranks/host", "timings/seconds"):
            if command == "run" or name in f:
                rows(f, name, world, problems)
        axes = [count_attr(f, name, problems, required=False)
                for name in ("data_parallel", "pipeline_parallel", "tensor_parallel",
                             "sequence_parallel")]
        if None not in axes[::2] and int(np.prod([a or 1 for a in axes])) != world:
            problems.append(f"root attributes data_parallel x pipeline_parallel x"
                            f" tensor_parallel x sequence_parallel = {axes[0]} x"
                            f" {axes[1] or 1} x {axes[2]} x {axes[3] or 1} is not"
                            f" world_size = {world}")
    version = h5safe.attr(f, "format_version")
    if isinstance(version, (int, np.integer)) and version >= 2:
        problems += _unnamed_axes(f)
    if "heads" in f:
        problems += _implausible_heads(f)
    return problems + PROMISES[command](f, config)


def _unnamed_axes(f: Any) -> list[str]:
    """Format 2 names every axis of every dataset with an attached dimension scale (README,
    "Dimensions and units"); the scales themselves excepted. One line per dataset."""
    from . import h5safe

    problems = []
    for name, dset in h5safe.datasets(f):
        if h5safe.attr(dset, "CLASS") in (b"DIMENSION_SCALE", "DIMENSION_SCALE"):
            continue
        missing = [axis for axis in range(len(dset.shape or ())) if len(dset.dims[axis]) == 0]
        if missing:
            problems.append(f"dataset /{name}: axis {missing[0]} has no dimension scale"
                            " (format 2 names every axis)")
    return problems


def _implausible_heads(f: Any) -> list[str]:
    """Per-head statistics that cannot be: a negative entropy or distance, or a mean over
    fewer than one query token."""
    from . import h5safe

    problems = []
    tokens = h5safe.attr(f["heads"], "query_tokens")
    if tokens is not None and (not isinstance(tokens, (int, np.integer)) or tokens < 1):
        problems.append(f"attribute 'query_tokens' of /heads is {h5safe.short(tokens)}, not a"
                        " count >= 1")
    for name in ("entropy", "distance"):
        if f"heads/{name}" in f:
            values = h5safe.read(f[f"heads/{name}"])
            if values.dtype.kind == "f" and values.size and np.nanmin(values) < 0:
                problems.append(f"/heads/{name} holds negative values ({np.nanmin(values):.3g}):"
                                " not a mean attention " + name)
    return problems


def recorded_inputs(path: str | Path) -> dict[str, str]:
    """The digests of the inputs the job that wrote ``path`` read (root attribute
    ``input_digests``: label -> SHA-256 hex; {} in files written before it existed).
    Raises ``InputError`` (one line) when the file cannot be opened safely or the
    attribute is not such a table."""
    import json

    from . import h5safe

    with open_for_reading(path) as f:
        raw = h5safe.attr(f, "input_digests")
        if raw is None:
            return {}
        try:
            table = json.loads(h5safe.text(raw, "attribute 'input_digests' of /"))
        except ValueError:
            table = None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise InputError(f"'{path}': attribute 'input_digests' of / is not a JSON table of"
                         f" digests: {h5safe.NOT_OURS}")
    return table

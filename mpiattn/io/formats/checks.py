"""The small checks ``verify`` and every kind's ``promised`` share: a dataset is there
(with its digest), a root attribute is a count, a dataset has one row per rank. Each
appends one-line problems to a list; none raises for a file that is merely wrong."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import h5safe
from ..h5io import DIGEST_ATTR


def count_attr(f: Any, name: str, problems: list[str], required: bool = True) -> int | None:
    """Root attribute ``name`` as a count >= 1 (None, with a problem line, otherwise)."""
    value = h5safe.attr(f, name)
    if value is None:
        if required:
            problems.append(f"root attribute '{name}' is missing")
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"root attribute '{name}' is {h5safe.short(value)}, not a count >= 1")
        return None
    return value


def rows(f: Any, name: str, world: int, problems: list[str]) -> None:
    """Dataset ``name`` has one row per rank."""
    if need(f, name, problems, digest=False) and (not f[name].shape or
                                                   f[name].shape[0] != world):
        problems.append(f"/{name} has shape {f[name].shape}, not one row per rank of"
                        f" world_size = {world}")


def need(f: Any, name: str, problems: list[str], digest: bool = False,
          why: str = "") -> bool:
    """Dataset ``name`` is there (with its sha256 attribute when ``digest``); a problem
    line naming what is missing otherwise."""
    import h5py

    if not isinstance(f.get(name), h5py.Dataset):
        problems.append(f"dataset /{name} is missing{why}")
        return False
    if digest and DIGEST_ATTR not in f[name].attrs:
        problems.append(f"dataset /{name} has no '{DIGEST_ATTR}' attribute: its contents"
                        " cannot be checked")
    return True

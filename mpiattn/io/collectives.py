"""The checksum records table (``/checksum/collectives``): its row type and site names.

No MPI and no h5py here: ``mpiattn.open`` and ``verify`` read the table offline.
"""

from __future__ import annotations

import numpy as np

SITE_BYTES = 16
# ``site`` is ASCII bytes, NUL-padded, as uint8[16]: netCDF-C (xarray's default engine with
# netCDF4) aborts the process on a compound with a fixed-length string member. Files
# before this held ``S16``; ``site_names`` reads both.
RECORD_DTYPE = np.dtype([
    ("replica", "i4"), ("layer", "i4"), ("site", "u1", (SITE_BYTES,)), ("residual", "f8"),
    ("bound", "f8"), ("ratio", "f8"), ("passed", "u1"), ("retries", "i4"), ("digest", "u8"),
    ("chunk", "i4"),
])


def site_codes(names: list[str]) -> np.ndarray:
    """(len(names), SITE_BYTES) uint8: each name's ASCII bytes, NUL-padded (cut at 16)."""
    raw = np.array([n.encode("ascii", "replace")[:SITE_BYTES] for n in names],
                   dtype=f"S{SITE_BYTES}")
    return raw.view(np.uint8).reshape(len(names), SITE_BYTES)


def site_names(table: np.ndarray) -> np.ndarray:
    """The ``site`` column of a records table as ``S16`` bytes (b"mlp"), whether the file
    stored it as uint8[16] (now) or as a fixed-length string (older files)."""
    column = np.asarray(table["site"])
    if column.dtype.kind == "S":
        return column
    flat = np.ascontiguousarray(column, dtype=np.uint8).reshape(-1, column.shape[-1])
    return flat.view(f"S{column.shape[-1]}").reshape(column.shape[:-1])

"""A safetensors file read through its own header, slice by slice, in every float width.

    f = TensorFile(path)                 # InputError (one line) when it is not one
    f.shape("bert.embeddings.word_embeddings.weight")
    f.read(name, (slice(0, 64),))        # float32 (F16, BF16, F32) or float64 (F64)

The format: 8 bytes little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the data, offsets counted from the end of the header. Each tensor is a read-only
memory map, so a rank reads only the rows it slices. ``safetensors``' NumPy loader cannot
hold bfloat16, and torch is no dependency of mpiattn: here F16 is widened by NumPy and
BF16 as what it is, the upper 16 bits of a float32 (``bits << 16``), both exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # stored -> read as
_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the float32 values they stand for, exactly."""
    return (bits.astype("<u4") << np.uint32(16)).view("<f4")


class TensorFile:
    """The tensors of one safetensors file (memory-mapped, read on demand)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 2 <= n <= min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} does not fit the file's {size} bytes")
                header = json.loads(fh.read(n).decode("utf-8"))
        except OSError as err:
            raise InputError(f"'{path}' cannot be read: {err.strerror}") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"'{path}' is not a readable safetensors file: {err}") from None
        if not isinstance(header, dict):
            raise InputError(f"'{path}' is not a readable safetensors file: its header is not"
                             " a JSON object")
        self.start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = self._entry(name, entry, size - self.start)

    def _entry(self, name: str, entry: Any, data_bytes: int) -> tuple[str, tuple[int, ...], int]:
        where = f"'{self.path}' is not a readable safetensors file: tensor '{name}'"
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{where}: its header entry is malformed") from None
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes \
                or end - begin != count * _SIZES.get(dtype, (end - begin) // max(count, 1)):
            raise InputError(f"{where}: bytes {begin}..{end} do not hold a {dtype} tensor"
                             f" of shape {shape} inside the file (truncated or damaged?)")
        return dtype, shape, begin

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        """The stored dtype name (F64, F32, F16, BF16)."""
        return self.entries[name][0]

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        """``tensor[index]`` as float32 (F16, BF16, F32) or float64 (F64), exact.

        Raises InputError (one line) for a tensor stored in another dtype."""
        dtype, shape, begin = self.entries[name]
        if dtype not in DTYPES:
            raise InputError(f"'{self.path}': tensor '{name}' is stored as {dtype}; mpiattn"
                             f" reads floating-point weights only ({', '.join(DTYPES)})")
        if 0 in shape:
            raw = np.zeros(shape, dtype=DTYPES[dtype])
        else:  # a scalar is mapped as one element
            raw = np.memmap(self.path, dtype=DTYPES[dtype], mode="r",
                            offset=self.start + begin, shape=shape or (1,)).reshape(shape)
        part = np.array(raw[index] if index != () else raw)
        if dtype == "BF16":
            return widen_bf16(part)
        return part.astype(np.float32) if dtype == "F16" else part

"""Algorithm-based fault tolerance for a sum of partials: checksum rows, bound, hash, flips.

Pure functions on NumPy or CuPy arrays (the arithmetic stays on the array's device); the
Allreduce that carries the rows lives in ``comm``.

The scheme (Huang & Abraham, 1984): a rank's partial ``P_r`` (n rows, m columns) travels
with two extra rows, the column sums ``c_r`` of ``P_r`` and ``a_r`` of ``|P_r|``. One
Allreduce(SUM) then delivers ``Y = sum_r P_r``, ``c = sum_r c_r`` and ``a = sum_r a_r``,
and linearity says ``colsum(Y) == c`` up to rounding, which ``bound`` below makes precise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import get_array_module, to_host, wrapping_dot

CHECK_ROWS = 2  # column sums, then column sums of absolute values


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    nu = n * u
    if nu >= 1.0:
        return float("inf")
    return nu / (1.0 - nu)


def unit_roundoff(dtype: Any) -> float:
    return float(np.finfo(dtype).eps) / 2.0


def bound_factor(rows: int, ranks: int, dtype: Any) -> float:
    """The factor ``f`` in ``|colsum(Y) - c| <= f * a`` for clean data.

    Derivation, per column, with ``A* = sum_r sum_i |P_r[i]|`` exact, ``u`` the unit
    roundoff of the wire dtype (the partials convert to it exactly), n rows and k ranks.
    Any summation order or tree obeys ``|fl(sum x) - sum x| <= gamma_{len-1} sum |x|``:

    1. sender:   ``|c_r - sum_i P_r[i]| <= gamma_{n-1} A*_r``            (n-row sum)
    2. reduction: ``|Y[i] - sum_r P_r[i]| <= gamma_{k-1} sum_r |P_r[i]|`` (k-term sums),
                 ``|c - sum_r c_r| <= gamma_{k-1} (1 + gamma_{n-1}) A*``
    3. receiver: ``|t - sum_i Y[i]| <= gamma_{n-1} (1 + gamma_{k-1}) A*``  (t = colsum(Y))

    Adding the four gaps between ``t`` and ``c`` (the exact sums agree by linearity):
    ``|t - c| <= 2 (gamma_{n-1} + gamma_{k-1}) (1 + gamma_{n+k}) A*``, and since the
    received ``a`` is itself a rounded sum of non-negative terms, ``A* <= a / (1 -
    gamma_{n+k})``. Sums never lose accuracy to underflow (a sum in the subnormal range is
    exact), so the bound holds for data of any scale, with no absolute term; zero data gives
    ``0 <= 0``. It is a worst case: real rounding is far smaller, and a corruption ``delta``
    in one element is caught whenever ``|delta|`` exceeds it.
    """
    u = unit_roundoff(dtype)
    g_n, g_k = gamma(max(rows - 1, 0), u), gamma(max(ranks - 1, 0), u)
    g_all = gamma(rows + ranks, u)
    return 2.0 * (g_n + g_k) * (1.0 + g_all) / (1.0 - g_all)


_ones: dict[tuple[str, int, str], Any] = {}


def _ones_row(xp: Any, n: int, dtype: Any) -> Any:
    key = (xp.__name__, n, np.dtype(dtype).str)
    if key not in _ones:
        _ones[key] = xp.ones(n, dtype=dtype)
    return _ones[key]


def column_sums(x: Any, out: Any = None) -> Any:
    """``ones @ x``: column sums by BLAS gemv, faster than a reduction along axis 0.

    The products are by 1.0, so this is pure summation in some order, which is all the
    bound assumes.
    """
    xp = get_array_module(x)
    return xp.matmul(_ones_row(xp, x.shape[0], x.dtype), x, out=out)


def append_checksums(partial: Any, out: Any, abs_scratch: Any = None,
                     copy: bool = True) -> Any:
    """Write ``partial`` (n, m) and its two checksum rows into ``out`` (n+2, m), in out's dtype.

    The column sums are taken in ``out``'s dtype (float64 for a float32 payload on the
    float64 wire), so they add no rounding worth speaking of. The |partial| row only feeds
    the bound, so it may be summed in the partial's own dtype and then inflated by
    1/(1 - gamma_{n-1}): a sum of non-negative terms is never low by more than that, so the
    row stays an upper bound of the exact one. ``abs_scratch`` ((n, m), partial's dtype)
    avoids an allocation; ``copy=False`` when ``partial`` already is ``out[:n]``.
    """
    xp = get_array_module(partial)
    n = partial.shape[0]
    if copy:
        out[:n] = partial
    column_sums(out[:n], out=out[n])
    magnitude = column_sums(xp.abs(partial, out=abs_scratch))
    if magnitude.dtype == out.dtype:
        out[n + 1] = magnitude
    else:
        inflate = (1.0 + 4 * unit_roundoff(out.dtype)) / (
            1.0 - gamma(max(n - 1, 0), unit_roundoff(partial.dtype)))
        out[n + 1] = magnitude
        out[n + 1] *= inflate
    return out


SPLIT_CHUNK = 1 << 16  # elements of a float64 chunk of rows (512 KiB): stays in L2


def wide_checksum_rows(x: Any, out: Any, wide: Any, magnitude: Any) -> Any:
    """The two checksum rows ``append_checksums`` gives a float32 block ``x`` (n, m) on the
    float64 wire, into ``out`` (2, m) float64, without a float64 copy of the block.

    The rows go through in chunks of ``wide.shape[0]`` rows: a chunk is widened into
    ``wide`` (c, m) float64 and its |values| taken into ``magnitude`` (c, m, x's dtype),
    so every pass stays in cache. Chunked sums are sums in another order, which the
    bound allows; the |x| row is inflated as in ``append_checksums``.
    """
    n = x.shape[0]
    step = wide.shape[0]
    out[...] = 0
    for i in range(0, n, step):
        rows = x[i : i + step]
        r = rows.shape[0]
        wide[:r] = rows  # exact: float32 -> float64
        out[0] += column_sums(wide[:r])
        out[1] += column_sums(np.abs(rows, out=magnitude[:r]))
    out[1] *= (1.0 + 4 * unit_roundoff(out.dtype)) / (
        1.0 - gamma(max(n - 1, 0), unit_roundoff(x.dtype)))
    return out


def ratio_of_sums(t: Any, sums: Any, magnitudes: Any, rows: int, ranks: int
                  ) -> tuple[float, float, float]:
    """(max residual, bound at that column, max residual/bound) of a sum of ``rows`` rows
    whose column sums are ``t``, against the summed checksum rows ``sums`` and
    ``magnitudes`` (all (m,), one dtype)."""
    xp = get_array_module(t)
    residual, bound, ratio = _ratios(t, sums, magnitudes, rows, ranks)
    if xp is np:
        j = int(np.argmax(ratio))
        return float(residual[j]), float(bound[j]), float(ratio[j])
    # on a device: the three numbers in one copy to the host, not four synchronising reads
    picked = xp.stack((residual, bound, ratio))[:, xp.argmax(ratio)]
    r, b, q = (float(v) for v in to_host(picked))
    return r, b, q


def _ratios(t: Any, sums: Any, magnitudes: Any, rows: int, ranks: int) -> tuple[Any, Any, Any]:
    """Per column: |t - sums|, the rounding bound, their ratio (0/0 = 0, r/0 = inf)."""
    xp = get_array_module(t)
    residual = xp.abs(t - sums)
    bound = bound_factor(rows, ranks, t.dtype) * magnitudes
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = xp.where(residual == 0, 0.0, residual / bound)
    return residual, bound, xp.where(xp.isfinite(ratio), ratio, xp.inf)


def device_verdict(reduced: Any, ranks: int, finite_row: Any, result: Any = None,
                   before_hash: Any = None) -> tuple[float, float, float, bool, int]:
    """What a checked Allreduce on a device reads, in one copy to the host (not three
    blocking reads): ``residual_ratio(reduced, ranks)``, whether ``finite_row`` (the |P|
    row sent) holds a non-finite value, and ``digest64(result)`` (0 when None).

    ``before_hash()`` runs after the checksum test is queued and before the hash (result
    faults: the stream keeps that order). (residual, bound, ratio, non-finite, digest).
    """
    xp = get_array_module(reduced)
    n = reduced.shape[0] - CHECK_ROWS
    residual, bound, ratio = _ratios(column_sums(reduced[:n]), reduced[n], reduced[n + 1], n,
                                     ranks)
    picked = xp.stack((residual, bound, ratio))[:, xp.argmax(ratio)]
    parts = [picked.astype(xp.float64).view(xp.uint64),
             xp.isfinite(finite_row).all().astype(xp.uint64).reshape(1)]
    if before_hash is not None:
        before_hash()
    if result is not None:
        parts.append(_device_digest(result).reshape(1))
    host = to_host(xp.concatenate(parts))
    r, b, q = (float(v) for v in host[:3].view(np.float64))
    return r, b, q, not bool(host[3]), int(host[4]) if result is not None else 0


def residual_ratio(reduced: Any, ranks: int) -> tuple[float, float, float]:
    """(max residual, bound at that column, max residual/bound) of a reduced buffer.

    ``reduced`` is (n+2, m) as delivered by the Allreduce. A ratio above 1 means the sum
    is corrupted; non-finite checksums give an infinite ratio.
    """
    n = reduced.shape[0] - CHECK_ROWS
    return block_residual_ratio(reduced[:n], reduced[n], reduced[n + 1], ranks)


def block_residual_ratio(total: Any, sums: Any, magnitudes: Any, ranks: int
                         ) -> tuple[float, float, float]:
    """``residual_ratio`` of a sum ``total`` (n, m) whose summed checksum rows ``sums``
    and ``magnitudes`` are held apart from it."""
    return ratio_of_sums(column_sums(total), sums, magnitudes, total.shape[0], ranks)


_CHUNK = 1 << 16  # words hashed against one table of constants
_MASK = (1 << 64) - 1
_tables: dict[tuple[str, int, int], Any] = {}


def _odd_constants(xp: Any, count: int, salt: int) -> Any:
    """``count`` odd 64-bit constants, the same on every rank (fixed seed), cached."""
    key = (xp.__name__, count, salt)
    table = _tables.get(key)
    if table is None:
        rng = np.random.default_rng([0x6D706961, salt])
        host = rng.integers(0, 1 << 63, size=count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        table = _tables[key] = xp.asarray(host)
    return table


def digest64(x: Any) -> int:
    """A 64-bit hash of the bytes of ``x``, computed on its device, cheap (one integer dot).

    ``h = sum_i w_i c_i mod 2^64`` over the 64-bit words ``w_i`` with odd constants
    ``c_i`` (chunks of words get odd multipliers of their own). A flip of bit ``b`` in word
    ``i`` moves ``h`` by ``2^b * odd``, never 0 mod 2^64: every single-bit difference between
    two ranks' copies is seen; two differences cancel with probability about 2^-64.
    """
    xp = get_array_module(x)
    if xp is not np:  # computed on the device, one read
        return int(_device_digest(x))
    raw = xp.ascontiguousarray(x).reshape(-1).view(xp.uint8)
    if raw.size % 8:
        raw = xp.concatenate([raw, xp.zeros(8 - raw.size % 8, dtype=xp.uint8)])
    words = raw.view(xp.uint64)
    full = words.size // _CHUNK * _CHUNK
    consts = _odd_constants(xp, min(_CHUNK, max(words.size, 1)), 0)
    h = x.nbytes
    with np.errstate(over="ignore"):
        if full:
            per_chunk = wrapping_dot(words[:full].reshape(-1, _CHUNK), consts)
            h += int(wrapping_dot(per_chunk, _odd_constants(xp, per_chunk.size, 1)))
        if words.size > full:
            tail = words[full:]
            h += int(wrapping_dot(tail, consts[: tail.size])) * 0x9E3779B97F4A7C15
    return h & _MASK


def _device_digest(x: Any) -> Any:
    """``digest64`` of a device array as a 0-d uint64 device array (nothing read back):
    the same sums, wrapping mod 2^64 on the device instead of in Python integers."""
    xp = get_array_module(x)
    raw = xp.ascontiguousarray(x).reshape(-1).view(xp.uint8)
    if raw.size % 8:
        raw = xp.concatenate([raw, xp.zeros(8 - raw.size % 8, dtype=xp.uint8)])
    words = raw.view(xp.uint64)
    full = words.size // _CHUNK * _CHUNK
    consts = _odd_constants(xp, min(_CHUNK, max(words.size, 1)), 0)
    h = xp.full((), x.nbytes, dtype=xp.uint64)
    if full:
        per_chunk = wrapping_dot(words[:full].reshape(-1, _CHUNK), consts)
        h = h + wrapping_dot(per_chunk, _odd_constants(xp, per_chunk.size, 1))
    if words.size > full:
        tail = words[full:]
        h = h + wrapping_dot(tail, consts[: tail.size]) * xp.uint64(0x9E3779B97F4A7C15)
    return h


def device_digest(x: Any) -> Any:
    """``digest64`` of a device array as a (1,) uint64 device array, nothing read back: a
    buffer CUDA-aware MPI sends as it is, or one of several digests read in one copy."""
    return _device_digest(x).reshape(1)


def digests64(blocks: Any) -> np.ndarray:
    """(n,) uint64 host array: ``digest64`` of each ``blocks[i]``. On a device the n digests
    are computed there and read back in one copy (not n blocking reads)."""
    xp = get_array_module(blocks)
    if xp is np:
        return np.array([digest64(b) for b in blocks], dtype=np.uint64)
    return to_host(xp.stack([_device_digest(b) for b in blocks]))


def flip_bit(x: Any, index: int, bit: int) -> None:
    """Flip bit ``bit`` of element ``index`` (flat, C order) of ``x`` in place."""
    itemsize = x.dtype.itemsize
    if not 0 <= bit < 8 * itemsize:
        raise ValueError(f"bit {bit} is outside a {itemsize * 8}-bit {x.dtype} element")
    if not 0 <= index < x.size:
        raise ValueError(f"element {index} is outside an array of {x.size} elements")
    if not x.flags.c_contiguous:
        raise ValueError("flip_bit needs a C-contiguous array")
    xp = get_array_module(x)
    word = {2: xp.uint16, 4: xp.uint32, 8: xp.uint64}[itemsize]
    view = x.reshape(-1).view(word)
    view[index] ^= word(1) << word(bit)


# --- fault injection ----------------------------------------------------------------------

FAULT_KEYS = {"rank": int, "layer": int, "site": str, "index": int, "bit": int, "where": str,
              "times": int}
FAULT_WHERE = ("send", "result")


@dataclass(frozen=True)
class Fault:
    """Flip ``bit`` of element ``index`` on world rank ``rank`` at (layer, site).

    ``where = "send"`` corrupts the partial after its checksums are taken (a fault in
    transit or in the reduction); ``"result"`` corrupts one rank's copy of the reduced
    result (ranks disagree). It fires on the first ``times`` attempts, so a retry can heal it.
    """

    rank: int
    layer: int
    site: str
    index: int
    bit: int
    where: str = "send"
    times: int = 1


def parse_faults(entries: list, sites: tuple[str, ...], command: str = "") -> list[Fault]:
    """Validate ``fault.inject`` tables; errors name the entry, the key and, for a site
    outside ``sites``, the ``command`` whose sites they are."""
    from ..errors import ConfigError

    faults = []
    for n, entry in enumerate(entries):
        where = f"fault.inject[{n}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table like {{rank = 0, layer = 0, site ="
                              " \"attention\", index = 0, bit = 30}}")
        unknown = set(entry) - set(FAULT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)};"
                              f" known: {', '.join(FAULT_KEYS)}")
        for key in ("rank", "layer", "site", "index", "bit"):
            if key not in entry:
                raise ConfigError(f"{where}: '{key}' is required")
        for key, kind in FAULT_KEYS.items():
            if key in entry and (not isinstance(entry[key], kind) or isinstance(entry[key], bool)):
                raise ConfigError(f"{where}.{key} must be {kind.__name__}, got {entry[key]!r}")
        fault = Fault(**entry)
        if fault.site not in sites:
            of = f" is not a site of mpiattn {command}" if command else ""
            raise ConfigError(f"{where}.site = '{fault.site}'{of}: use one of {', '.join(sites)}")
        if fault.where not in FAULT_WHERE:
            raise ConfigError(f"{where}.where = '{fault.where}': use send or result")
        if min(fault.rank, fault.layer, fault.index, fault.bit) < 0 or fault.times < 1:
            raise ConfigError(f"{where}: rank, layer, index, bit must be >= 0 and times >= 1")
        faults.append(fault)
    return faults


# --- what the scheme can see: a reduction simulated in one process -----------------------


def simulated_allreduce(partials: list, wire: Any, rng: np.random.Generator,
                        fault: tuple[int, int, int] | None = None) -> np.ndarray:
    """The buffer an Allreduce of checksummed partials delivers, summed in a random order.

    ``fault = (rank, index, bit)`` flips a bit of that rank's payload after its checksums
    were taken, as ``where = "send"`` injection does.
    """
    n, m = partials[0].shape
    sends = []
    for r, p in enumerate(partials):
        buf = np.empty((n + CHECK_ROWS, m), wire)
        append_checksums(p, buf)
        if fault is not None and fault[0] == r:
            body = p.copy()
            flip_bit(body, fault[1], fault[2])
            with np.errstate(invalid="ignore", over="ignore"):
                buf[:n] = body
        sends.append(buf)
    order = rng.permutation(len(sends))
    total = sends[order[0]].copy()
    with np.errstate(invalid="ignore", over="ignore"):  # a flipped exponent may give inf
        for i in order[1:]:
            total += sends[i]
    return total


def simulated_split_ratio(partials: list, fault: tuple[int, int, int] | None = None) -> float:
    """The worst residual/bound over the row blocks of ``comm.SplitSum``, in one process.

    Rank j's block of the rows: every rank's clean block gives its float64 checksum rows,
    its (perhaps flipped, ``fault = (rank, index, bit)``) payload block is summed in
    float64 in rank order, and the sum is checked against the summed rows over k ranks.
    """
    from .shard import partition

    k = len(partials)
    n, m = partials[0].shape
    sent = []
    for r, p in enumerate(partials):
        body = p.copy()
        if fault is not None and fault[0] == r:
            flip_bit(body, fault[1], fault[2])
        sent.append(body)
    chunk = max(1, SPLIT_CHUNK // max(m, 1))
    wide, magnitude = np.empty((chunk, m)), np.empty((chunk, m), partials[0].dtype)
    check = np.empty((CHECK_ROWS, m))
    worst = 0.0
    for j in range(k):
        count, start = partition(n, k, j)
        rows = slice(start, start + count)
        total = np.zeros((count, m))
        sums = np.zeros((CHECK_ROWS, m))
        with np.errstate(invalid="ignore", over="ignore"):
            for r in range(k):
                sums += wide_checksum_rows(partials[r][rows], check, wide, magnitude)
                total += sent[r][rows]
        worst = max(worst, block_residual_ratio(total, sums[0], sums[1], k)[2])
    return worst


def detection_rate(bit: int, trials: int, rng: np.random.Generator, wire: Any = np.float64,
                   rows: int = 256, cols: int = 48, dtype: Any = np.float32,
                   split: bool = False) -> float:
    """Fraction of single flips of ``bit`` (random rank, element, 2-4 ranks) that fail the check.

    Partials are standard normal: elements of every size down to ~1e-4 of typical, which is
    where low mantissa bits fall under the rounding bound. ``split``: the check of
    ``comm.SplitSum`` (float64 sums per row block) instead of one Allreduce in ``wire``.
    """
    hits = 0
    for _ in range(trials):
        ranks = int(rng.integers(2, 5))
        parts = [rng.standard_normal((rows, cols)).astype(dtype) for _ in range(ranks)]
        fault = (int(rng.integers(ranks)), int(rng.integers(rows * cols)), bit)
        if split:
            ratio = simulated_split_ratio(parts, fault)
        else:
            _, _, ratio = residual_ratio(simulated_allreduce(parts, wire, rng, fault), ranks)
        hits += ratio > 1.0
    return hits / trials

"""The ABFT bound never fires on clean sums and always fires on flips above rounding noise."""

import numpy as np
import pytest

from mpiattn.core import checksum
from mpiattn.errors import ConfigError

simulate = checksum.simulated_allreduce


def clean_cases(rng):
    """Dtypes, shapes, scales 1e-30..1e30, mixed signs, cancellation, zeros, 2-4 ranks."""
    for case in range(1200):
        dtype = np.float32 if case % 2 else np.float64
        ranks = 2 + case % 3
        n, m = int(rng.integers(1, 300)), int(rng.integers(1, 40))
        scale = 10.0 ** rng.uniform(-30, 30)
        kind = case % 4
        parts = [rng.standard_normal((n, m)) * scale for _ in range(ranks)]
        if kind == 1:  # near-total cancellation between ranks
            parts[1] = -parts[0] + parts[1] * 1e-6
        elif kind == 2:  # wildly mixed magnitudes within a rank
            parts[0] *= 10.0 ** rng.uniform(-8, 8, size=(n, m))
        elif kind == 3:  # all-zero columns and uneven splits of one sum
            parts[0][:, : m // 2] = 0
        yield [p.astype(dtype) for p in parts], dtype


def test_no_false_alarm_on_clean_collectives():
    rng = np.random.default_rng(2026)
    worst, count = 0.0, 0
    for parts, dtype in clean_cases(rng):
        wire = np.float64  # what CheckedAllreduce sends in abft mode
        _, _, ratio = checksum.residual_ratio(simulate(parts, wire, rng), len(parts))
        worst = max(worst, ratio)
        count += 1
        # the bound is dtype-generic: it must also hold with a float32 wire
        if dtype == np.float32:
            _, _, ratio32 = checksum.residual_ratio(simulate(parts, np.float32, rng),
                                                    len(parts))
            assert ratio32 <= 1.0
    print(f"{count} clean collectives: worst residual/bound {worst:.3g}")
    assert count >= 1000 and worst <= 1.0


detection_rate = checksum.detection_rate


@pytest.mark.parametrize("bit", range(15, 32))
def test_exponent_sign_and_top_mantissa_flips_always_caught(bit):
    rate = detection_rate(bit, 60, np.random.default_rng(bit))
    assert rate == 1.0


def test_lowest_mantissa_bits_mostly_caught_with_float64_wire():
    rng = np.random.default_rng(0)
    rates = {bit: detection_rate(bit, 40, rng) for bit in (0, 4, 8)}
    print("detection by bit:", rates)
    assert rates[8] >= 0.95 and rates[0] >= 0.5


def test_native_wire_still_catches_exponent_flips():
    rng = np.random.default_rng(1)
    for bit in (27, 29, 30, 31):
        assert detection_rate(bit, 30, rng, wire=np.float32) > 0.8


def test_bound_is_tight_enough_to_matter():
    f = checksum.bound_factor(1024, 4, np.float64)
    assert 1e-14 < f < 1e-12
    assert checksum.bound_factor(1024, 4, np.float32) > 1e5 * f


def test_digest_sees_every_single_bit_flip():
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    base = checksum.digest64(x)
    assert base == checksum.digest64(x.copy())
    seen = set()
    for index in range(x.size):
        for bit in range(32):
            y = x.copy()
            checksum.flip_bit(y, index, bit)
            seen.add(checksum.digest64(y))
    assert base not in seen  # no single flip goes unseen
    assert len(seen) > x.size * 32 * 0.9  # and flips rarely look alike


def test_flip_bit_changes_the_value_as_ieee_says():
    x = np.array([1.0, 2.0], np.float32)
    checksum.flip_bit(x, 1, 31)
    assert x[1] == -2.0
    checksum.flip_bit(x, 0, 23)  # lowest exponent bit of 1.0 (biased 127 -> 126)
    assert x[0] == 0.5
    with pytest.raises(ValueError):
        checksum.flip_bit(x, 0, 32)


def test_fault_tables_are_validated():
    ok = checksum.parse_faults([{"rank": 1, "layer": 0, "site": "mlp", "index": 3, "bit": 30,
                                 "where": "result", "times": 2}], ("attention", "mlp"))
    assert ok[0].where == "result" and ok[0].times == 2
    for bad, msg in [({"rank": 1}, "'layer' is required"),
                     ({"rank": 0, "layer": 0, "site": "qkv", "index": 0, "bit": 1}, "site"),
                     ({"rank": 0, "layer": 0, "site": "mlp", "index": 0, "bit": 1, "x": 1},
                      "unknown key"),
                     ({"rank": "0", "layer": 0, "site": "mlp", "index": 0, "bit": 1},
                      "must be int")]:
        with pytest.raises(ConfigError, match=msg):
            checksum.parse_faults([bad], ("attention", "mlp"))


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_wide_checksum_rows_are_append_checksums_rows(chunk_rows):
    """Chunk by chunk, the float64 column sums equal the whole block's (to float64
    rounding) and the |x| row is an upper bound of the exact one, as tight as before."""
    x = np.random.default_rng(8).standard_normal((50, 9)).astype(np.float32) * 1e3
    out = np.empty((2, 9))
    checksum.wide_checksum_rows(x, out, np.empty((chunk_rows, 9)),
                                np.empty((chunk_rows, 9), np.float32))
    whole = checksum.append_checksums(x, np.empty((52, 9)))[50:]
    exact = np.abs(x.astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(out[0], whole[0], rtol=0, atol=1e-15 * exact.max() * 50)
    assert (out[1] >= exact).all() and (out[1] <= whole[1] * (1 + 1e-6)).all()


def test_split_sums_give_no_false_alarm_on_clean_collectives():
    """``comm.SplitSum``'s check (float64 sums per row block, in rank order) over the same
    1,200 clean cases as the Allreduce's, float32 partials only (what takes that path)."""
    rng = np.random.default_rng(2027)
    worst, count = 0.0, 0
    for parts, dtype in clean_cases(rng):
        if dtype != np.float32 or parts[0].shape[0] < len(parts):
            continue
        worst = max(worst, checksum.simulated_split_ratio(parts))
        count += 1
    print(f"{count} clean split sums: worst residual/bound {worst:.3g}")
    assert count >= 500 and worst <= 1.0


@pytest.mark.parametrize("bit", [31, 30, 27, 23, 22, 15, 8])
def test_split_sums_catch_every_flip_from_bit_8_up(bit):
    assert detection_rate(bit, 40, np.random.default_rng(bit), split=True) == 1.0


def test_split_sums_catch_low_mantissa_flips_at_least_as_often_as_one_allreduce():
    rng = np.random.default_rng(5)
    split = {bit: detection_rate(bit, 60, rng, split=True) for bit in (0, 2, 4)}
    whole = {bit: detection_rate(bit, 60, rng) for bit in (0, 2, 4)}
    print("split:", split, "one float64 Allreduce:", whole)
    assert all(split[b] >= whole[b] - 0.05 for b in split) and split[0] >= 0.5

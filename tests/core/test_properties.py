"""Property-based tests (hypothesis): the sharded model equals the one-process reference
for any shape and any head-rank count; shards tile the model; the configuration accepts or
refuses anything with a ConfigError and nothing else. Few, small examples: they run in the
serial suite (threads stand in for ranks, tests/helpers.ThreadGroup).
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from helpers import TOL, sharded_forward
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mpiattn import config
from mpiattn.core import reference
from mpiattn.core.shard import counts, head_shard, partition, weighted_counts
from mpiattn.errors import ConfigError
from mpiattn.inputs.data import load_batch
from mpiattn.io.weights import open_source

FEW = settings(max_examples=15, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def model_shapes(draw: st.DrawFn) -> tuple[config.Config, int]:
    """A small valid config and a head-rank count 1..heads."""
    heads = draw(st.integers(1, 6))
    head_dim = draw(st.integers(1, 6))
    seq = draw(st.integers(1, 9))
    flat = {
        "model.layers": draw(st.integers(1, 2)), "model.heads": heads,
        "model.hidden": heads * head_dim, "model.ffn": draw(st.integers(heads, 3 * heads + 5)),
        "model.vocab": draw(st.integers(2, 40)), "model.max_positions": seq + draw(
            st.integers(0, 3)),
        "input.batch": draw(st.integers(1, 3)), "input.seq_len": seq,
        "input.min_fill": draw(st.sampled_from([0.01, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**16)), "dtype": "float64",
        "model.layer_norm_eps": 1e-6,
    }
    return config.from_dict(flat), draw(st.integers(1, heads))


@FEW
@given(model_shapes())
def test_sharded_equals_reference_for_any_shape_and_rank_count(case):
    cfg, k = case
    batch = load_batch(cfg)
    attn, hidden = reference.forward(batch.ids, batch.mask,
                                     open_source(cfg.seed, cfg.model, cfg.dtype), cfg.model)
    got = sharded_forward(cfg, k)
    for layer, (a, h) in enumerate(got):
        err = max(reference.relative_error(a, attn[layer]),
                  reference.relative_error(h, hidden[layer]))
        assert err <= TOL["float64"], f"layer {layer}, {k} of {cfg.model.heads} heads: {err:.2e}"


@FEW
@given(st.integers(1, 24), st.integers(1, 9), st.integers(1, 200), st.data())
def test_head_shards_tile_columns_and_mlp(heads, head_dim, extra_ffn, data):
    """Any split (even or measured): the ranks' Q columns and MLP columns tile the model."""
    ffn = heads + extra_ffn
    parts = data.draw(st.integers(1, heads))
    weights = data.draw(st.lists(st.floats(0.1, 10), min_size=parts, max_size=parts))
    for split in (None, weighted_counts(heads, weights)):
        shards = [head_shard(heads, head_dim, ffn, parts, i, split) for i in range(parts)]
        assert [s.count for s in shards] == (split or counts(heads, parts))
        assert min(s.count for s in shards) >= 1
        col = mlp = 0
        for s in shards:
            assert s.cols.start == col and s.ffn_cols.start == mlp
            col, mlp = s.cols.stop, s.ffn_cols.stop
        assert (col, mlp) == (heads * head_dim, ffn)


@given(st.integers(1, 30), st.integers(1, 40))
def test_more_head_ranks_than_heads_is_refused_with_the_fix(heads, parts):
    if parts <= heads:
        assert sum(s.count for s in (head_shard(heads, 2, heads, parts, i)
                                     for i in range(parts))) == heads
        return
    with pytest.raises(ValueError, match=f"use parallel.tensor <= {heads}"):
        head_shard(heads, 2, heads, parts, 0)


@given(st.integers(0, 10**6), st.integers(1, 1000), st.data())
def test_partition_is_divmod(n, parts, data):
    index = data.draw(st.integers(0, parts - 1))
    count, start = partition(n, parts, index)
    base, extra = divmod(n, parts)
    assert count == base + (index < extra)
    assert start == sum(partition(n, parts, i)[0] for i in range(index))  # no gaps
    assert 0 <= start <= n and start + count <= n


@given(st.integers(1, 64), st.integers(0, 8), st.integers(1, 64), st.integers(1, 64))
def test_check_world_gives_a_factorisation_or_a_config_error(world, tensor, heads, batch):
    cfg = config.from_dict({"parallel.tensor": tensor, "model.heads": heads,
                            "model.hidden": heads * 4, "model.ffn": heads * 4,
                            "input.batch": batch})
    try:
        t, d = config.check_world(cfg, world)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert t * d == world and 1 <= t <= heads and d <= batch
    assert t == (tensor or world)


# --- the configuration never crashes --------------------------------------------------

KEYS = config.all_keys()
toml_scalars = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=12), st.sampled_from(["float32", "abft", "all", "auto"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(string.ascii_lowercase, max_size=5), inner,
                                            max_size=3)),
    max_leaves=6,
)
dotted_keys = st.one_of(
    st.sampled_from(KEYS),
    st.builds(lambda k, cut: k[:cut], st.sampled_from(KEYS), st.integers(1, 20)),  # typos
    st.text(string.ascii_lowercase + "._", min_size=1, max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(dotted_keys, toml_values, max_size=5))
def test_config_from_random_keys_and_values_is_valid_or_config_error(flat):
    try:
        cfg = config.from_dict(flat)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    config.validate(cfg)  # what was accepted stays valid
    again = config.from_dict(config._flatten(__import__("tomllib").loads(cfg.to_toml())))
    assert again.to_toml() == cfg.to_toml()  # survives the trip through an output file


def values_for(key: str) -> st.SearchStrategy:
    """Mostly values of the key's own type (NaN, huge, control characters included)."""
    kind = type(config.get(config.Config(), key))
    own = {int: st.integers(), float: st.floats(), str: st.text(max_size=12),
           bool: st.booleans(),
           list: st.lists(st.dictionaries(st.text(max_size=4), toml_values, max_size=3),
                          max_size=2)}[kind]
    return st.one_of(own, own, toml_values)


known_settings = st.lists(st.sampled_from(KEYS).flatmap(
    lambda key: st.tuples(st.just(key), values_for(key))), max_size=4).map(dict)


@settings(max_examples=300, deadline=None)
@given(known_settings)
def test_known_keys_with_any_value_are_valid_or_config_error(flat):
    test_config_from_random_keys_and_values_is_valid_or_config_error.hypothesis.inner_test(flat)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=3))
def test_set_overrides_of_any_text_are_valid_or_config_error(overrides):
    try:
        config.load(None, overrides)
    except ConfigError as err:
        assert str(err)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200)))
def test_config_files_of_any_bytes_are_valid_or_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "random.toml"
    path.write_bytes(raw)
    try:
        config.load(path)
    except ConfigError as err:
        assert str(err)


@FEW
@given(st.integers(1, 5), st.integers(1, 12), st.integers(2, 50), st.data())
def test_token_file_round_trip(tmp_path_factory, batch, seq, vocab, data):
    """Any valid ids and prefix mask written as a run file's /input come back unchanged."""
    import h5py

    from mpiattn.inputs.data import hdf5_batch

    lengths = data.draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    ids = np.array(data.draw(st.lists(st.lists(st.integers(1, vocab - 1), min_size=seq,
                                               max_size=seq), min_size=batch, max_size=batch)))
    mask = np.arange(seq)[None, :] < np.array(lengths)[:, None]
    ids[~mask] = 0
    dtype = data.draw(st.sampled_from(["i8", "i4", "u2", "u8"]))
    assume(np.iinfo(dtype).max >= vocab)
    path = tmp_path_factory.getbasetemp() / "tokens.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("input/tokens", data=ids.astype(dtype))
        if data.draw(st.booleans()):
            f.create_dataset("input/attention_mask", data=mask.astype(np.uint8))
    got = hdf5_batch(path, vocab, seq)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.mask, mask)
    assert got.ids.dtype == np.int64

"""Per-head attention entropy and distance (Clark et al. 2019) and attention maps, against
a direct NumPy computation from the full probabilities, with padding, on every kernel."""

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TOL, ThreadGroup, dim_names, direct_head_stats, run_ranks, tiny
from test_attention import case as attention_case

from mpiattn import config
from mpiattn.commands.cli import main
from mpiattn.core import attention as attention_module
from mpiattn.core import reference
from mpiattn.core.attention import KeyMask, Options, heads_attention
from mpiattn.core.headstats import HeadResults, HeadStats, from_probabilities, means, rank_sums
from mpiattn.core.model import encoder_forward
from mpiattn.core.shard import head_shard
from mpiattn.errors import ConfigError
from mpiattn.inputs.data import load_batch
from mpiattn.io import h5io
from mpiattn.io.formats.run import write_heads
from mpiattn.io.verify import verify
from mpiattn.io.weights import open_source


def case(batch=3, seq=37, heads=4, d=8, seed=0, prefix=True):
    """``test_attention.case`` with one real token in the last sequence (entropy 0,
    distance 0)."""
    return attention_case(batch, seq, heads, d, seed, prefix, last_length=1)


def full_probabilities(qkv, mask, batch, seq, heads, d):
    """(B, h, S, S) softmax(q k^T / sqrt(d)) with padding keys at exactly 0, in float64."""
    q, k = (qkv.astype(np.float64).reshape(batch, seq, 3, heads, d)[:, :, i]
            .transpose(0, 2, 1, 3) for i in range(2))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    s = np.where(mask[:, None, None, :], s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


KERNELS = [("plain", 0, 1, True), ("plain", 0, 1, False), ("plain", 0, 2, False),
           ("blocked", 5, 1, False), ("blocked", 16, 2, False), ("blocked", 64, 1, False)]


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize(("impl", "block", "workers", "batched"), KERNELS)
def test_kernel_statistics_equal_direct_computation(monkeypatch, prefix, impl, block,
                                                    workers, batched):
    if not batched:  # the per-(sequence, head) loop, as at long sequences on the CPU
        monkeypatch.setattr(attention_module, "_BATCHED_SCORES", 0)
    batch, seq, heads, d = 3, 37, 4, 8
    qkv, mask = case(prefix=prefix)
    stats = HeadStats(np, layers=2, first_head=0, heads=heads, map_sequences=(0, 2))
    out = np.empty((batch * seq, heads * d))
    km = KeyMask.from_mask(mask)
    heads_attention(qkv, out, batch, seq, heads, d, km, Options(impl, block, workers),
                    stats.at(1))
    probs = full_probabilities(qkv, mask, batch, seq, heads, d)
    want_h, want_d = direct_head_stats(probs, mask)
    got_h, got_d = stats.entropy[1] / stats.queries[1], stats.distance[1] / stats.queries[1]
    print(f"{impl} block {block}: max |dH| {np.abs(got_h - want_h).max():.1e} nats,"
          f" max |dD| {np.abs(got_d - want_d).max():.1e} tokens")
    np.testing.assert_allclose(got_h, want_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-12, atol=1e-12)
    assert stats.queries[1] == mask.sum() and stats.queries[0] == 0
    assert not stats.entropy[0].any()
    assert sorted(stats.maps) == [(0, 1), (2, 1)]
    for b in (0, 2):
        np.testing.assert_allclose(stats.maps[(b, 1)], probs[b], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.reshape(batch, seq, heads, d).transpose(0, 2, 1, 3),
                               probs @ qkv.reshape(batch, seq, 3, heads, d)[:, :, 2]
                               .transpose(0, 2, 1, 3), rtol=1e-10, atol=1e-12)


def test_limits_one_key_and_uniform():
    """One key: H = 0, D = 0. Equal scores over n keys: H = ln n, D = mean |i - j|."""
    seq = 6
    p = np.full((1, 1, seq, seq), 1.0 / seq)
    h, dist = from_probabilities(p)
    np.testing.assert_allclose(h, np.log(seq))
    pos = np.arange(seq)
    np.testing.assert_allclose(dist[0, 0], np.abs(pos[:, None] - pos).mean(axis=1))
    one = np.zeros((seq, seq))
    one[:, 2] = 1.0
    h, dist = from_probabilities(one)
    assert (h == 0).all()
    np.testing.assert_array_equal(dist, np.abs(pos - 2))


def test_blocked_float32_statistics_within_tolerance():
    batch, seq, heads, d = 2, 300, 2, 16
    qkv, mask = case(batch, seq, heads, d)
    stats = HeadStats(np, layers=1, first_head=0, heads=heads)
    out = np.empty((batch * seq, heads * d), np.float32)
    heads_attention(qkv.astype(np.float32), out, batch, seq, heads, d, KeyMask.from_mask(mask),
                    Options("blocked", 64), stats.at(0))
    want_h, want_d = direct_head_stats(full_probabilities(qkv.astype(np.float32), mask, batch, seq,
                                               heads, d), mask)
    got_h, got_d = stats.entropy[0] / stats.queries[0], stats.distance[0] / stats.queries[0]
    assert np.abs(got_h - want_h).max() / want_h.max() < TOL["float32"]
    assert np.abs(got_d - want_d).max() / want_d.max() < TOL["float32"]


@pytest.mark.parametrize("split", [[5], [3, 2], [2, 2, 1], [1, 1, 1, 1, 1]])
def test_rank_sums_combine_to_the_one_process_statistics(split):
    """Threads as ranks: two data-parallel replicas, each a head group with an uneven split;
    every rank's sums, combined, give the statistics and maps of the one-process
    reference's probabilities."""
    cfg = tiny(model__heads=5, model__hidden=40, dtype="float64", input__batch=5)
    m = cfg.model
    batch = load_batch(cfg)
    source = open_source(cfg.seed, m, cfg.dtype)
    probs: list = []
    reference.forward(batch.ids, batch.mask, source, m, probabilities=probs)
    replicas = [(0, 3), (3, 2)]  # (first sequence, count)
    groups = [ThreadGroup(len(split)) for _ in replicas]
    sinks: dict[tuple[int, int], HeadStats] = {}

    def work(replica: int, rank: int) -> None:
        first, count = replicas[replica]
        shard = head_shard(m.heads, m.hidden // m.heads, m.ffn, len(split), rank, split)
        mine = batch.rows(first, count)
        stats = sinks[(replica, rank)] = HeadStats(np, m.layers, shard.start, shard.count,
                                                   first_row=first, map_sequences=(1, 4))
        encoder_forward(mine.ids, mine.mask, source.embeddings(),
                        [source.layer(i, shard) for i in range(m.layers)],
                        groups[replica].member(rank), m.layer_norm_eps, stats=stats)

    run_ranks(work, [(r, i) for r in range(len(replicas)) for i in range(len(split))], groups)
    entropy, distance, tokens = means(np.stack([rank_sums(s, m.heads)
                                                for s in sinks.values()]))
    assert (tokens == batch.mask.sum()).all()
    for layer in range(m.layers):
        want_h, want_d = direct_head_stats(probs[layer], batch.mask)
        print(f"{split} layer {layer}: max |dH| {np.abs(entropy[layer] - want_h).max():.1e},"
              f" max |dD| {np.abs(distance[layer] - want_d).max():.1e}")
        np.testing.assert_allclose(entropy[layer], want_h, rtol=TOL["float64"])
        np.testing.assert_allclose(distance[layer], want_d, rtol=TOL["float64"])
        for seq_index in (1, 4):
            got = np.concatenate([s.maps[(seq_index, layer)] for (_, rank), s in
                                  sorted(sinks.items()) if (seq_index, layer) in s.maps])
            np.testing.assert_allclose(got, probs[layer][seq_index], atol=1e-14)


# --- configuration, refusals, file layout, verify, report --heads ------------------------


@pytest.mark.parametrize(("maps", "message"), [
    ([-1], "integers >= 0"), ([1.5], "integers >= 0"), ([True], "integers >= 0"),
    ([2, 2], "repeats an index"), ("3", "must be a list"),
])
def test_attention_maps_must_be_distinct_indices(maps, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"output.attention_maps": maps})


def test_config_round_trip_keeps_the_keys():
    cfg = config.from_dict({"output.head_stats": True, "output.attention_maps": [3, 0]})
    text = cfg.to_toml()
    assert "head_stats = true" in text and "attention_maps = [3, 0]" in text


@pytest.mark.parametrize("key", ["output.head_stats", "output.attention_maps"])
def test_text_input_and_training_refuse_head_output(tmp_path, key):
    from mpiattn.commands.encode import check_inputs as text_checks
    from mpiattn.commands.train import check_training

    value = True if key == "output.head_stats" else [0]
    cfg = tiny(input__text=str(tmp_path / "lines.txt"), **{key.replace(".", "__"): value})
    with pytest.raises(ConfigError, match=f"{key} is not yet supported with text input"):
        text_checks(cfg, 1, 0)
    with pytest.raises(ConfigError, match="written by mpiattn run only"):
        check_training(tiny(**{key.replace(".", "__"): value}), 1, None, False)


def heads_file(path: Path, stats: bool = True, maps: bool = True, layers: int = 2,
               heads: int = 3) -> Path:
    """A run file as ``layout`` writes it (``write_heads``), with the promised rest."""
    rng = np.random.default_rng(0)
    maps_of = [2] if maps else []
    cfg = tiny(model__layers=layers, model__heads=heads, model__hidden=6 * heads,
               output__head_stats=stats, output__attention_maps=maps_of,
               output__layers="none", checksum__mode="off")
    result = HeadResults(
        entropy=rng.random((layers, heads)) * 3 if stats else None,
        distance=rng.random((layers, heads)) * 10 if stats else None, query_tokens=77,
        sequences=maps_of, maps=rng.random((1, layers, heads, 24, 24)).astype(np.float32)
        if maps else None)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format_version": 1, "command": "run", "config": cfg.to_toml(),
                        "world_size": 1, "tensor_parallel": 1, "data_parallel": 1,
                        "pipeline_parallel": 1, "head_partition": [heads]})
        batch = load_batch(cfg)
        h5io.write_array(f, "input/tokens", batch.ids, ("batch", "seq"), digest=True)
        h5io.write_array(f, "input/attention_mask", batch.mask.astype(np.uint8),
                         ("batch", "seq"), digest=True)
        f["timings/seconds"] = np.full((1, layers, 6), 0.1)
        f["timings/forward"] = [0.6]
        f["ranks/host"] = ["node0"]
        write_heads(f, result)
        f.attrs["status"] = "complete"
    return path


def test_verify_reads_and_checks_the_heads_group(tmp_path):
    path = heads_file(tmp_path / "h.h5")
    assert verify(path) == []
    with h5py.File(path, "a") as f:
        assert dim_names(f["heads/maps"]) == ["sequence", "layer", "head", "query", "key"]
        del f["heads/distance"]
        f["heads/entropy"][0, 0] = np.nan
    problems = verify(path)
    assert any("/heads/entropy does not match its sha256" in p for p in problems)
    with h5py.File(path, "a") as f:
        del f["heads/entropy"]
    problems = verify(path)
    assert problems == [
        "dataset /heads/entropy is missing (output.head_stats = true)",
        "dataset /heads/distance is missing (output.head_stats = true)"]


def test_report_heads_tables_json_and_refusals(tmp_path, capsys):
    path = heads_file(tmp_path / "h.h5")
    assert main(["report", "--heads", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mean attention entropy [nats], layer x head:" in out
    assert "over 77 query tokens" in out and "maps      1 x 2 x 3 x 24 x 24" in out
    assert main(["report", "--heads", "--json", str(path)]) == 0
    heads = json.loads(capsys.readouterr().out)["files"][0]["heads"]
    with h5py.File(path) as f:
        np.testing.assert_array_equal(heads["entropy"], f["heads/entropy"][()])
    assert heads["query_tokens"] == 77 and heads["maps_shape"] == [1, 2, 3, 24, 24]
    plain = heads_file(tmp_path / "maps-only.h5", stats=False)
    assert main(["report", "--heads", str(plain)]) == 2
    assert "has no /heads/entropy" in capsys.readouterr().err
    assert main(["report", str(plain)]) == 0  # without --heads: the summary line only


def test_report_heads_plot_and_what_plot_refuses(tmp_path, monkeypatch, capsys):
    path = str(heads_file(tmp_path / "h.h5", layers=12, heads=12))
    other = str(heads_file(tmp_path / "g.h5"))
    for bad, says in ((str(tmp_path / "x.jpg"), "plots are written as PNG"),
                      (str(tmp_path), "is not a regular file")):
        assert main(["report", "--heads", path, "--plot", bad]) == 2
        assert says in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    out = tmp_path / "heads.png"
    assert main(["report", "--heads", path, other, "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "--heads", path, "--plot", str(out)]) == 2
    assert "exists: choose another --plot name" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", "--heads", path, "--plot", str(tmp_path / "n.png")]) == 2
    assert "pip install 'mpiattn[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize(("rows", "cols", "first_row", "first_col"), [
    (5, 1, 0, 0), (1, 5, 0, 0), (1, 1, 3, 3), (4, 4, 0, 4), (4, 4, 4, 0), (4, 3, 8, 2),
    (4, 6, 2, 5), (3, 7, 0, 0), (6, 2, 3, 1),
])
def test_weight_sums_on_any_block(rows, cols, first_row, first_col):
    """The distance sum of a key block left of, right of or across its queries."""
    from mpiattn.core.headstats import weight_sums

    e = np.random.default_rng(rows * cols).random((2, rows, cols))
    e[0, :, 0] = 0  # a masked key
    i = np.arange(first_row, first_row + rows)[:, None]
    j = np.arange(first_col, first_col + cols)[None, :]
    a, c = weight_sums(e, first_row, first_col)
    with np.errstate(divide="ignore", invalid="ignore"):
        want_a = np.where(e > 0, e * np.log(e), 0).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(a, want_a, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(c, (e * np.abs(i - j)).sum(axis=-1, keepdims=True),
                               rtol=1e-13, atol=1e-13)


def test_verify_fails_statistics_that_cannot_be(tmp_path):
    """A negative entropy or distance, or a mean over no query token, fails verify (even
    with its digest recomputed): report would print them as measurements."""
    for name, damage in (("entropy", lambda f: f["heads/entropy"].__setitem__((0, 0), -1.0)),
                         ("distance", lambda f: f["heads/distance"].__setitem__((1, 2), -3.0)),
                         ("query_tokens", lambda f: f["heads"].attrs.__setitem__(
                             "query_tokens", -5))):
        path = heads_file(tmp_path / f"{name}.h5", maps=False)
        with h5py.File(path, "a") as f:
            damage(f)
            for key in ("entropy", "distance"):
                f[f"heads/{key}"].attrs[h5io.DIGEST_ATTR] = h5io.sha256(f[f"heads/{key}"][()])
        problems = verify(path)
        assert any(name in p for p in problems), (name, problems)

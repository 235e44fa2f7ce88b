"""``mpiattn plan`` on text-run and training files (``analysis.phasemodel``): phase costs
read from tiny files written here, predictions at N ranks, the part that stops scaling."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest

from mpiattn.analysis import phasemodel as pm
from mpiattn.analysis.plan import plan_command
from mpiattn.errors import ConfigError


def text_file(path, ranks=2, lines=1000, fmt="text", scan_bytes=None):
    with h5py.File(path, "w") as f:
        f.attrs.update({"lines": lines, "input_format": fmt})
        t = f.create_group("timings")
        t["tokenize"] = np.full(ranks, 0.5)
        t["scan"] = np.full(ranks, 0.2)
        t["busy"] = np.full(ranks, 8.0)
        t["forward"] = np.full(ranks, 9.0)  # rank 0: 9 - 8 - 0.5 = 0.5 s gather/write
        t["setup"] = np.full(ranks, 1.0)
        w = f.create_group("work")
        w["lines_tokenized"] = np.full(ranks, lines // ranks)
        if scan_bytes is not None:
            w["scan_bytes"] = np.asarray(scan_bytes)
    return path


def train_file(path, tensor=2, data=1, zero=False):
    steps = 4
    sec = np.zeros((tensor * data, steps, 5))
    sec[:, :, 0], sec[:, :, 1], sec[:, :, 2], sec[:, :, 3] = 1.0, 2.0, 0.3, 0.4
    sec[:, 0, :] *= 5  # the first step warms up: left out
    with h5py.File(path, "w") as f:
        f.attrs.update({"tensor_parallel": tensor, "data_parallel": data,
                        "config": f"[parallel]\nzero = {'true' if zero else 'false'}\n"})
        f.create_group("train")
        d = f.create_group("timings").create_dataset("seconds", data=sec)
        d.attrs["phases"] = ["forward", "backward", "allreduce", "optimizer", "checkpoint"]
    return path


def test_text_costs_and_predictions(tmp_path):
    c = pm.text_costs(text_file(tmp_path / "t.h5"))
    assert (c.ranks, c.lines, c.scan, c.tokenize, c.encode_rank_s, c.write, c.setup) == (
        2, 1000, 0.2, 0.5, 16.0, 0.5, 1.0)
    rows = pm.predict_text(c, [1, 2, 64])
    assert rows[1].phases == {"scan": 0.2, "tokenize": 0.5, "encode": 8.0,
                              "gather/write": 0.5, "setup": 1.0}  # the measured point
    assert rows[2].phases["encode"] == pytest.approx(0.25)
    assert rows[2].phases["gather/write"] == 0.5 and rows[2].phases["scan"] == \
        pytest.approx(0.2 * 2 / 64)
    assert pm.first_to_stop(rows, pm.TEXT_FIXED) == ("setup", 64)
    gpu = pm.predict_text(c, [2], gpu_speedup=40)[0]
    assert gpu.phases["encode"] == pytest.approx(8.0 / 40) and gpu.phases["tokenize"] == 0.5
    whole = pm.text_costs(text_file(tmp_path / "g.h5", fmt="text+gzip"))
    assert pm.predict_text(whole, [8])[0].phases["scan"] == 0.2  # rank 0 scans it all


def test_training_costs_and_predictions(tmp_path):
    c = pm.train_costs(train_file(tmp_path / "tr.h5"))
    assert (c.tensor, c.data, c.zero) == (2, 1, False)
    assert (c.fb, c.allreduce, c.optimizer) == pytest.approx((3.0, 0.3, 0.4))
    rows = pm.predict_train(c, [1, 2, 4, 8])
    assert [r.ranks for r in rows] == [2, 4, 8]  # tensor 2 divides them
    assert rows[0].total == pytest.approx(3.7)
    assert rows[2].phases["forward+backward"] == pytest.approx(0.75)
    assert rows[2].phases["optimizer"] == pytest.approx(0.4)
    z = pm.train_costs(train_file(tmp_path / "z.h5", tensor=1, data=2, zero=True))
    r4 = pm.predict_train(z, [4])[0].phases
    assert r4["optimizer"] == pytest.approx(0.2)  # ZeRO-1: sharded over replicas
    assert r4["allreduce"] == pytest.approx(0.3 * 1.5 / 1.0)  # 2(D-1)/D: 1.5 against 1


def test_plan_command_on_phase_files(tmp_path, capsys):
    args = argparse.Namespace(files=[str(text_file(tmp_path / "t.h5")),
                                     str(train_file(tmp_path / "tr.h5"))],
                              ranks="1,2,4,1024", cores=None, measured_cores=None,
                              ranks_per_node=None, nodes_alpha=None, nodes_beta=None,
                              overrides=[], layout="heads", memory=None, json=False,
                              gpu_speedup=None)
    assert plan_command(args) == 0
    out = capsys.readouterr().out
    assert "stops scaling first: gather/write" in out or "stops scaling first: setup" in out
    assert "lines/s" in out and "training: tensor 2 x data 1" in out
    assert "stops scaling first: optimizer" in out
    args.gpu_speedup = -1.0
    with pytest.raises(ConfigError, match="--gpu-speedup must be a finite factor > 0"):
        plan_command(args)


@pytest.mark.parametrize(("scan_bytes", "split"), [([500, 480], True), ([1000, 0], False),
                                                   (None, False)])
def test_jsonl_scan_shrinks_when_it_was_split(tmp_path, scan_bytes, split):
    """Uncompressed JSON Lines is scanned by byte ranges now (every rank's ``scan_bytes``
    above 0); a file written when rank 0 scanned it alone keeps its whole scan."""
    c = pm.text_costs(text_file(tmp_path / "j.h5", fmt="jsonl", scan_bytes=scan_bytes))
    assert c.split_scan is split
    assert pm.predict_text(c, [8])[0].phases["scan"] == pytest.approx(0.2 * 2 / 8 if split
                                                                      else 0.2)

"""The replicated share of a training step (``analysis.trainshare``, printed by ``plan``).

At the fine-tuning config (all-MiniLM-L6-v2: 6 layers, 12 heads, hidden 384, ffn 1536,
30,522 words; batch 16 x 128, 15% masked) on tensor 2 the ranks of a head group repeat at
most 5% of their FLOPs with the vocabulary split and over 15% without it; a tiny shape
is counted by hand. With 2 pipeline stages and with 2 sequence slices the work is
conserved against one process (plus what those layouts repeat: the tied copy's
optimizer, the optimizer on every slice) and the split keeps each share <= 5%.
"""

from __future__ import annotations

import json

import pytest
from test_plan import synthetic_run

from mpiattn.analysis import trainshare
from mpiattn.commands.cli import main

MINILM = {"layers": 6, "heads": 12, "hidden": 384, "ffn": 1536, "vocab": 30522,
          "batch": 16, "seq": 128, "mask_prob": 0.15}


def test_finetune_share_at_tensor_2():
    on = trainshare.step_flops(**MINILM, tensor=2, vocab_split=True)
    off = trainshare.step_flops(**MINILM, tensor=2, vocab_split=False)
    print(f"replicated share at tensor 2: {100 * on['replicated_share']:.2f}% split,"
          f" {100 * off['replicated_share']:.2f}% whole vocabulary")
    assert on["replicated_share"] <= 0.05 < 0.15 < off["replicated_share"]
    assert on["per_rank"] < off["per_rank"]
    one = trainshare.step_flops(**MINILM, tensor=1, vocab_split=True)
    # the work is conserved: two ranks' shares plus one copy of the repeats = one rank's
    assert one["per_rank"] == pytest.approx(2 * on["sharded"] + on["replicated"])


def test_tiny_shape_by_hand():
    got = trainshare.step_flops(layers=1, heads=2, hidden=2, ffn=4, vocab=10, batch=1,
                                seq=2, mask_prob=0.5, tensor=2, vocab_split=True,
                                max_positions=4, type_vocab=1)
    n, h, f, masked = 2, 2, 4, 1
    layer = 2 * n * h * 3 * h + 2 * n * h * h + 4 * n * h * f + 4 * 1 * 2 * 2 * h
    decoder = 3 * 2 * masked * h * 10 + trainshare.SOFTMAX_FLOPS * masked * 10
    sharded = (3 * layer + decoder + trainshare.OPTIMIZER_FLOPS * (10 * h + 10)) / 2
    small = 6 * h + (4 + 1 + 2) * h + h * h + 3 * h
    replicated = (3 * 2 * masked * h * h + trainshare.ELEMENTWISE_FLOPS * n * h
                  + trainshare.EMBED_FLOPS * n * h + trainshare.OPTIMIZER_FLOPS * small)
    assert got["sharded"] == pytest.approx(sharded)
    assert got["replicated"] == pytest.approx(replicated)


def test_stages_and_slices_conserve_the_work():
    one = trainshare.step_flops(**MINILM, tensor=1, vocab_split=True)
    h, v = MINILM["hidden"], MINILM["vocab"]
    ends = [trainshare.step_flops(**MINILM, tensor=2, vocab_split=True, pipeline=2, stage=s)
            for s in (0, 1)]
    # the stages' work = one process's + the optimizer on the last stage's tied copy
    total = sum(2 * e["sharded"] + e["replicated"] for e in ends)
    assert total == pytest.approx(one["per_rank"] + trainshare.OPTIMIZER_FLOPS * v * h)
    whole_last = trainshare.step_flops(**MINILM, tensor=2, vocab_split=False, pipeline=2)
    flat = trainshare.step_flops(**MINILM, tensor=2, vocab_split=False)
    assert whole_last["replicated_share"] > flat["replicated_share"]  # the decoder's stage
    sliced = trainshare.step_flops(**MINILM, tensor=2, vocab_split=True, sequence=2)
    # the slices' work = one process's + every slice's optimizer on the parameters
    # step_flops counts as optimizer work (all but the layers' sharded weights)
    params = (6 * 6 * h + (512 + 2 + 2) * h + h * h + 3 * h) + v * h + v
    total = 2 * (2 * sliced["sharded"] + sliced["replicated"])
    assert total == pytest.approx(one["per_rank"] + trainshare.OPTIMIZER_FLOPS * params)
    for got in (*ends, sliced):
        assert got["replicated_share"] <= 0.05
    print(f"replicated share at tensor 2 with the split: stages {ends[0]['replicated_share']:.2%}"
          f" / {ends[1]['replicated_share']:.2%}, slices {sliced['replicated_share']:.2%};"
          f" the last stage without the split {whole_last['replicated_share']:.2%}")


def test_plan_prints_the_training_share(tmp_path, capsys):
    import h5py

    path = synthetic_run(tmp_path / "s1.h5", 1)
    with h5py.File(path, "r+") as f:  # the file's model with a vocabulary
        f.attrs["config"] = f.attrs["config"].replace("[input]", "vocab = 500\n[input]")
    assert main(["plan", str(path), "--ranks", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "training step at tensor 2" in out and "replicated share" in out
    assert "tensor 2 x pipeline 2, last stage" in out and "tensor 2 x sequence 2" in out
    assert main(["plan", str(path), "--ranks", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["training"]
    assert 0 < data["tensor2_vocab_split"]["replicated_share"] < data[
        "tensor2_whole_vocab"]["replicated_share"]
    assert {"tensor2_pipeline2_first_stage", "tensor2_pipeline2_last_stage",
            "tensor2_sequence2"} <= set(data)

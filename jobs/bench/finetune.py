"""Fine-tuning benchmark: ``mpiattn train`` against PyTorch ``BertForMaskedLM``, same batches.

    python jobs/bench/finetune.py                      # 2 ranks, 20 steps, batch 16 x 128
    python jobs/bench/finetune.py --ranks 2 --steps 30 --batch 16 --seq-len 128

Both continue masked-language-model training of all-MiniLM-L6-v2 on data/corpus with
AdamW (the settings of jobs/configs/finetune-minilm.toml) on the same global batches
(``mpiattn.inputs.corpus.train_batch``: BERT masking seeded by step):

- ``mpiexec -n R mpiattn train`` (OMP_NUM_THREADS=1, one core per rank): seconds per
  optimizer step from its ``/train/tokens_per_second``;
- transformers' ``BertForMaskedLM`` with ``torch.optim.AdamW`` in one process using as many
  threads as the ranks had cores, timed around forward, backward and the update.

Reports the median step time of each (the first 2 steps are warm-up and left out) and
their ratio (PyTorch / mpiattn: above 1 means mpiattn is faster). Needs the test extra
(torch, transformers). Nothing is asserted; a failed step exits 1 with one line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jobs/configs/finetune-minilm.toml"
WARMUP = 2


def settings(args: argparse.Namespace) -> list[str]:
    return [f"input.batch={args.batch}", f"input.seq_len={args.seq_len}",
            f"train.steps={args.steps}", "train.checkpoint_every=0", "train.export=",
            "train.eval_batches=1", f"train.eval_every={args.steps}",
            f"train.corpus={ROOT / 'data/corpus/train.txt'}",
            f"train.heldout={ROOT / 'data/corpus/heldout.txt'}"]


def mpiattn_steps(args: argparse.Namespace, work: Path) -> np.ndarray:
    """Seconds per step of ``mpiattn train`` on ``args.ranks`` ranks."""
    import h5py

    out = work / "train.h5"
    cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "mpiattn", "train",
           str(CONFIG), "-o", str(out)]
    for s in settings(args):
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if proc.returncode:
        sys.exit(f"finetune bench: mpiattn train failed: {proc.stderr.strip()[-300:]}")
    with h5py.File(out) as f:
        tokens_per_second = f["train/tokens_per_second"][()]
    return args.batch * args.seq_len / tokens_per_second


def torch_steps(args: argparse.Namespace) -> np.ndarray:
    """Seconds per step of BertForMaskedLM + AdamW on the same batches, one process."""
    import torch
    from transformers import BertForMaskedLM

    from mpiattn import config
    from mpiattn.commands.placement import apply_checkpoint_shape
    from mpiattn.inputs.corpus import Corpus, train_batch
    from mpiattn.io.weights import model_folder

    torch.set_num_threads(args.ranks)
    cfg = config.load(CONFIG, settings(args))
    apply_checkpoint_shape(cfg)
    corpus = Corpus.load(cfg)
    model = BertForMaskedLM.from_pretrained(model_folder(cfg.model.weights)).train()
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay)
    seconds = []
    for step in range(args.steps):
        b = train_batch(corpus, cfg, step, 1, 0)
        labels = np.full(b.ids.size, -100, dtype=np.int64)
        labels[b.positions] = b.targets
        ids = torch.as_tensor(b.ids)
        mask = torch.as_tensor(b.key_mask.astype(np.int64))
        labels = torch.as_tensor(labels.reshape(b.ids.shape))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return np.asarray(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ours = mpiattn_steps(args, Path(work))[WARMUP:]
    theirs = torch_steps(args)[WARMUP:]
    a, b = float(np.median(ours)), float(np.median(theirs))
    print(f"fine-tuning all-MiniLM-L6-v2, batch {args.batch} x {args.seq_len}, AdamW,"
          f" {args.steps - WARMUP} timed steps")
    print(f"  mpiattn train, {args.ranks} ranks x 1 thread: {a:.3f} s/step (median)")
    print(f"  PyTorch BertForMaskedLM, 1 process x {args.ranks} threads: {b:.3f} s/step")
    print(f"  ratio PyTorch / mpiattn: {b / a:.2f} (above 1: mpiattn faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

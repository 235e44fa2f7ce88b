#!/usr/bin/env bash
# The prepared GPU check: installs what it needs unless it all imports, runs the GPU tests,
# the main job on CuPy with verify, the GPU benchmark (seq 512, a sweep to 16,384, CuPy's
# GEMM limit) and a CPU strong-scaling run that `mpiattn plan` predicted from its 1-, 2-
# and 4-rank runs alone (jobs/gpu/scaling.py), and writes one HDF5 file.
#   bash jobs/gpu/check.sh [OUT_DIR]        -> OUT_DIR/gpu-check.h5 (default ./gpu-check)
# QUICK=1 runs the same steps with small shapes; on a CPU, CI runs it on the CuPy stand-in
#   PYTHONPATH=.:tests/standin QUICK=1 bash jobs/gpu/check.sh OUT   (docs/gpu-standin.md)
# and BACKEND=numpy runs it on NumPy.
# Offline (a GPU node that reaches no package index): WHEELS=DIR installs every wheel in
# DIR, then mpiattn without its dependencies; give the wheels of whatever of CuPy, mpi4py,
# h5py, safetensors, tokenizers, threadpoolctl, tqdm the node lacks, and always an MPI
# (mpich) and pytest-mpi, e.g. for a node whose Python 3.12 has all but those two:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       mpich pytest-mpi
set -euo pipefail
out=$(realpath -m -- "${1:-${OUT:-gpu-check}}")  # relative to where it was started
wheels=${WHEELS:+$(realpath -m -- "$WHEELS")}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
backend=${BACKEND:-cupy}
run_shape=()  # the main job: the embedded BERT-base default
shape=(--set input.seq_len=512 --set model.max_positions=16384)
sweep=512,2048,8192,16384
scaling=()  # the strong-scaling job: the main job
fit=1,2,4
predict=8,16
if [ -n "${QUICK:-}" ]; then
    shape=(--set model.layers=2 --set model.hidden=128 --set model.heads=4 --set model.ffn=256
           --set input.batch=2 --set input.seq_len=64 --set model.vocab=1000)
    run_shape=("${shape[@]}")
    sweep=32,128
    scaling=(--set model.layers=2 --set model.hidden=64 --set model.heads=2
             --set model.ffn=128 --set input.batch=2 --set input.seq_len=32
             --set model.vocab=1000)
    fit=1,2  # a 2-core machine: 4 ranks in 2 head x 2 data, predicted from 1 and 2
    predict=4
fi

needs="import cupy, mpi4py.MPI, h5py, safetensors, tokenizers, threadpoolctl, tqdm, pytest_mpi"
if ! python3 -c "$needs; import mpiattn" 2>/dev/null; then
    if [ -n "$wheels" ]; then  # offline: every wheel given, then mpiattn without its deps
        python3 -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl
        python3 -m pip install -q --no-build-isolation --no-deps -e .
    else
        python3 -m pip install -q -e ".[mpi,gpu]" pytest pytest-mpi hypothesis
    fi
    if ! python3 -c "$needs; import mpiattn"; then
        echo "check.sh: still missing after the install (above); give its wheel in WHEELS" >&2
        exit 1
    fi
fi
python3 -c "from mpiattn.core.backend import cupy_device_count as n; print('GPUs:', n())"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        > "$out/nvidia-smi.csv" || true
fi

# 1. GPU tests (CuPy numerics against the NumPy reference), then the attention tests
python3 -m pytest -q -p no:cacheprovider tests/commands/test_gpu.py tests/core/test_attention.py \
    --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"

# 2. The main job on the GPU, checked offline
mpiexec -n 1 mpiattn run --set backend="$backend" "${run_shape[@]}" \
    -o "$out/run-gpu.h5" --force
mpiattn verify "$out/run-gpu.h5"

# 3. The benchmark: BERT-base attention block and layer at seq 512, then a length sweep
mpiexec -n 1 mpiattn bench --set backend="$backend" "${shape[@]}" --sweep "$sweep" \
    --repeats 10 -o "$out/bench-gpu.h5" --force

# 4. CPU strong scaling at 1, 2, 4, 8 and 16 ranks: 8 and 16 predicted by `plan` from
#    the first three alone, then measured in the layout it chose (out of sample)
python3 jobs/gpu/scaling.py "$out/scaling" --fit "$fit" --predict "$predict" \
    "${scaling[@]}" 2>&1 | tee "$out/scaling.log"

# 5. One file holding it all
python3 - "$out" <<'PY'
import sys
from pathlib import Path

import h5py

from mpiattn.io.h5io import atomic_file
from mpiattn.io.outfile import Reservation

out = Path(sys.argv[1])
with atomic_file(Reservation.make(out / "gpu-check.h5", force=True)) as f:
    for name in ("run-gpu.h5", "bench-gpu.h5", "scaling/scaling.h5"):
        with h5py.File(out / name, "r") as src:
            g = f.create_group(Path(name).stem)
            for key in src:
                src.copy(key, g)
            g.attrs.update(src.attrs)
    f.attrs["tests_junit"] = (out / "gpu-tests.xml").read_text()
    smi = out / "nvidia-smi.csv"
    f.attrs["nvidia_smi"] = smi.read_text() if smi.exists() else "nvidia-smi not found"
    f.attrs["status"] = "complete"
print(f"wrote {out / 'gpu-check.h5'}")
PY

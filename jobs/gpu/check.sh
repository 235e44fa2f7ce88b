#!/usr/bin/env bash
# The prepared GPU check, one short run (a few minutes on one H100 and 16 cores; each step
# has a time limit, 8 minutes in all): installs what it needs unless it all imports, runs
# the GPU tests, the main job on CuPy with verify, the GPU benchmark (seq 512, a sweep to
# 16,384, CuPy's GEMM limit) and a CPU strong-scaling run that `mpiattn plan` predicted
# from its 1-, 2- and 4-rank runs alone (jobs/gpu/scaling.py), and writes one HDF5 file.
# A failing step does not stop the others; the end prints one line per step (passed or
# not, seconds, its figures) and exits 1 when any failed.
#   bash jobs/gpu/check.sh [OUT_DIR]        -> OUT_DIR/gpu-check.h5 (default ./gpu-check)
# mpiattn runs from this checkout (python3 -m mpiattn, PYTHONPATH): it needs no install.
# QUICK=1 runs the same steps with small shapes; on a CPU, CI runs it on the CuPy stand-in
#   PYTHONPATH=.:tests/standin QUICK=1 bash jobs/gpu/check.sh OUT   (docs/gpu-standin.md)
# and BACKEND=numpy runs it on NumPy.
# Offline (a GPU node that reaches no package index): WHEELS=DIR installs every wheel in
# DIR, then mpiattn without its dependencies; give the wheels of whatever of CuPy, mpi4py,
# h5py, safetensors, tokenizers, threadpoolctl, tqdm the node lacks, and an MPI with its
# mpiexec (mpich) where the node has none, e.g. for a node whose Python 3.12 has all but it:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       mpich
set -uo pipefail  # no -e: every step runs, each one's outcome is noted (steps.tsv)
out=$(realpath -m -- "${1:-${OUT:-gpu-check}}")  # relative to where it was started
wheels=${WHEELS:+$(realpath -m -- "$WHEELS")}
cd "$(dirname "$0")/../.." || exit 1
mkdir -p "$out" || exit 1
rm -f "$out/steps.tsv"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mpiattn
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # Open MPI as root (GPU nodes)
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

needs="import cupy, mpi4py.MPI, h5py, safetensors, tokenizers, threadpoolctl, tqdm, pytest"
if ! python3 -c "$needs; import mpiattn" 2>/dev/null || ! command -v mpiexec >/dev/null; then
    if [ -n "$wheels" ]; then  # offline: every wheel given
        python3 -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl
    else
        python3 -m pip install -q -e ".[mpi,gpu]" pytest hypothesis
    fi
    hash -r
    if ! python3 -c "$needs; import mpiattn" || ! command -v mpiexec >/dev/null; then
        echo "check.sh: still missing after the install (above, or no mpiexec): give its" \
             "wheel in WHEELS" >&2
        exit 1
    fi
fi
python3 -c "from mpiattn.core.backend import cupy_device_count as n; print('GPUs:', n())"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
        > "$out/nvidia-smi.csv" || true
fi

step() {  # step NAME SECONDS LOG CMD...: CMD under a time limit, its output also in LOG
    local name=$1 limit=$2 log=$3 start=$SECONDS rc verdict=passed
    shift 3
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then verdict="timed out (${limit} s)"
    elif [ "$rc" -ne 0 ]; then verdict="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$verdict" $((SECONDS - start)) >> "$out/steps.tsv"
}

# 1. GPU tests (CuPy numerics against the NumPy reference), then the attention tests
step tests 120 gpu-tests.log python3 -m pytest -q -p no:cacheprovider \
    tests/commands/test_gpu.py tests/core/test_attention.py --junitxml "$out/gpu-tests.xml"

# 2. The main job on the GPU, checked offline
step run 90 run-gpu.log mpiexec -n 1 python3 -m mpiattn run --set backend="$backend" \
    "${run_shape[@]}" -o "$out/run-gpu.h5" --force
step verify 60 verify.log python3 -m mpiattn verify "$out/run-gpu.h5"

# 3. The benchmark: BERT-base attention block and layer at seq 512, then a length sweep
step bench 180 bench-gpu.log mpiexec -n 1 python3 -m mpiattn bench --set backend="$backend" \
    "${shape[@]}" --sweep "$sweep" --repeats 10 -o "$out/bench-gpu.h5" --force

# 4. CPU strong scaling at 1, 2, 4, 8 and 16 ranks: 8 and 16 predicted by `plan` from
#    the first three alone, then measured in the layout it chose (out of sample)
step scaling 150 scaling.log python3 jobs/gpu/scaling.py "$out/scaling" --fit "$fit" \
    --predict "$predict" "${scaling[@]}"

# 5. One file holding it all, and what passed with its figures
python3 jobs/gpu/summary.py "$out"

#!/bin/bash
# Training run of mpiattn on a workstation with mpiexec.
#
#   NP=4 jobs/local/train.sh [CONFIG.toml] [OUT.h5] [--set KEY=VALUE ...]
#   RESUME=ckpt.h5 NP=4 jobs/local/train.sh ...   # start from this checkpoint
#   RESUME= NP=4 jobs/local/train.sh ...          # start from scratch
#
# NP ranks (default 2), each with cores/NP BLAS threads unless OMP_NUM_THREADS
# is set. CONFIG "" or "-" means the built-in defaults; OUT defaults to
# mpiattn-train-<date-time>.h5. Anything after OUT goes to `mpiattn train` as
# is. MPIEXEC picks another launcher (default: mpiexec on PATH).
#
# Ctrl-C (or kill -USR1/-TERM on mpiexec) stops at the end of the current step
# with a checkpoint and exit code 75; a second one stops at once. By default
# (RESUME unset: --resume auto) a run starts from the newest complete
# checkpoint named by train.checkpoint, so running the same command again
# continues where it stopped (the same OUT: its partial output is replaced).
set -euo pipefail

NP=${NP:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
RESUME=${RESUME-auto}
cores=$(nproc)
[[ $NP =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: NP must be a positive integer, got '$NP'" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NP > 0 ? cores / NP : 1))}

config=${1:-}
out=${2:-mpiattn-train-$(date +%Y%m%d-%H%M%S).h5}
shift $(($# < 2 ? $# : 2))

command -v mpiattn >/dev/null || { echo "train.sh: mpiattn not on PATH; activate its venv" >&2; exit 1; }

args=(train)
if [[ -n $config && $config != - ]]; then args+=("$config"); fi
args+=(-o "$out")
if [[ -n $RESUME ]]; then args+=(--resume "$RESUME"); fi
args+=("$@")

read -r -a mpiexec <<<"$MPIEXEC"
echo "$NP ranks x $OMP_NUM_THREADS threads ($cores cores)"
echo "+ ${mpiexec[*]} -n $NP mpiattn ${args[*]}"
rc=0
"${mpiexec[@]}" -n "$NP" mpiattn "${args[@]}" || rc=$?
if ((rc == 75)); then
    echo "train.sh: stopped with a checkpoint; run the same command again to continue" >&2
fi
exit "$rc"

#!/bin/bash
# Forward pass of mpiattn on a workstation with mpiexec.
#
#   NP=4 jobs/local/run.sh [CONFIG.toml] [OUT.h5] [--set KEY=VALUE ...]
#
# NP ranks (default 2), each with cores/NP BLAS threads unless OMP_NUM_THREADS
# is set. CONFIG "" or "-" means the built-in defaults; OUT defaults to
# mpiattn-run-<date-time>.h5. Anything after OUT goes to `mpiattn run` as is.
# MPIEXEC picks another launcher (default: mpiexec on PATH).
set -euo pipefail

NP=${NP:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
cores=$(nproc)
[[ $NP =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: NP must be a positive integer, got '$NP'" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NP > 0 ? cores / NP : 1))}

config=${1:-}
out=${2:-mpiattn-run-$(date +%Y%m%d-%H%M%S).h5}
shift $(($# < 2 ? $# : 2))

command -v mpiattn >/dev/null || { echo "run.sh: mpiattn not on PATH; activate its venv" >&2; exit 1; }

args=(run)
if [[ -n $config && $config != - ]]; then args+=("$config"); fi
args+=(-o "$out" "$@")

read -r -a mpiexec <<<"$MPIEXEC"
echo "$NP ranks x $OMP_NUM_THREADS threads ($cores cores)"
echo "+ ${mpiexec[*]} -n $NP mpiattn ${args[*]}"
"${mpiexec[@]}" -n "$NP" mpiattn "${args[@]}"

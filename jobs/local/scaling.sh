#!/bin/bash
# Strong-scaling sweep of `mpiattn run` over rank counts on a workstation:
# one HDF5 file per count, <PREFIX>-n<K>.h5.
#
#   RANKS="1 2 4" jobs/local/scaling.sh [CONFIG.toml] [PREFIX] [--set KEY=VALUE ...]
#
# RANKS defaults to the powers of two up to the core count. Threads per rank
# are cores / (largest rank count) for every step, unless OMP_NUM_THREADS is
# set. CONFIG "" or "-" means the built-in defaults; PREFIX defaults to
# scaling-<date-time>. MPIEXEC picks another launcher (default: mpiexec).
set -euo pipefail

MPIEXEC=${MPIEXEC:-mpiexec}
cores=$(nproc)
if [[ -z ${RANKS:-} ]]; then
    RANKS=""
    for ((k = 1; k <= cores; k *= 2)); do RANKS+="$k "; done
fi
read -r -a ranks <<<"$RANKS"
max=1
for k in "${ranks[@]}"; do
    [[ $k =~ ^[1-9][0-9]*$ ]] || { echo "scaling.sh: bad rank count '$k' in RANKS" >&2; exit 1; }
    if ((k > max)); then max=$k; fi
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / max > 0 ? cores / max : 1))}

config=${1:-}
prefix=${2:-scaling-$(date +%Y%m%d-%H%M%S)}
shift $(($# < 2 ? $# : 2))

command -v mpiattn >/dev/null || { echo "scaling.sh: mpiattn not on PATH; activate its venv" >&2; exit 1; }

read -r -a mpiexec <<<"$MPIEXEC"
echo "ranks ${ranks[*]} x $OMP_NUM_THREADS threads ($cores cores)"
for k in "${ranks[@]}"; do
    args=(run)
    if [[ -n $config && $config != - ]]; then args+=("$config"); fi
    args+=(-o "${prefix}-n${k}.h5" "$@")
    echo "+ ${mpiexec[*]} -n $k mpiattn ${args[*]}"
    start=$SECONDS
    "${mpiexec[@]}" -n "$k" mpiattn "${args[@]}"
    echo "n=$k: $((SECONDS - start)) s -> ${prefix}-n${k}.h5"
done

#!/usr/bin/env bash
# The whole test suite: serial tests, then the MPI tests on 2, 3, 4 and 5 ranks
# (12 heads on 5 ranks is the uneven split users hit). Run from anywhere:
#   bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest -q -p no:cacheprovider tests
for ranks in 2 3 4 5; do
    echo "== MPI tests on ${ranks} ranks"
    # --oversubscribe is implied by MPICH; one BLAS thread per rank keeps 5 ranks honest
    OMP_NUM_THREADS=1 mpiexec -n "${ranks}" \
        python -m pytest -q -p no:cacheprovider --with-mpi --only-mpi tests/mpi
done

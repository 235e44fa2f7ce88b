#!/usr/bin/env bash
# The whole test suite: serial tests, then the MPI tests on 2, 3, 4 and 5 ranks
# (12 heads on 5 ranks is the uneven split users hit). Every part runs even when an
# earlier one fails; the failures of all parts are listed together at the end, and the
# exit status is non-zero when any part failed. Run from anywhere:
#   bash tests/run.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

failed=()
summary=()
log=$(mktemp -d "${TMPDIR:-/tmp}/mpiattn-tests.XXXXXX")
trap 'rm -rf "$log"' EXIT

part() {  # part NAME COMMAND...: run one part, keep its closing line and its failures
    local name=$1
    shift
    echo "== ${name}"
    "$@" 2>&1 | tee "$log/part.txt"
    local rc=${PIPESTATUS[0]}
    summary+=("${name}: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log/part.txt" | tail -1 | tr -d '=' | xargs)")
    if [ "$rc" -ne 0 ]; then
        failed+=("${name} (exit ${rc})")
        grep -E '^(FAILED|ERROR) ' "$log/part.txt" | sed "s/^/    [${name}] /" >> "$log/failures.txt"
    fi
}

# A part that hangs (a rank waiting for one that failed alone inside an in-process MPI
# test) is killed after PART_LIMIT seconds and reported failed, rather than holding CI.
PART_LIMIT=${PART_LIMIT:-2400}
part "serial" timeout -k 10 "${PART_LIMIT}" python -m pytest -q -p no:cacheprovider -rfE tests
for ranks in 2 3 4 5; do
    # --oversubscribe is implied by MPICH; one BLAS thread per rank keeps 5 ranks honest
    part "MPI tests on ${ranks} ranks" timeout -k 10 "${PART_LIMIT}" env OMP_NUM_THREADS=1 \
        mpiexec -n "${ranks}" python -m pytest -q -p no:cacheprovider -rfE --with-mpi \
        --only-mpi tests/mpi
done

echo "== summary"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed parts: ${failed[*]}"
    [ -f "$log/failures.txt" ] && sort -u "$log/failures.txt"
    exit 1
fi
echo "all parts passed"

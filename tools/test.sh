#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up the environment, lint and type check
# (tools/lint.sh; fails fast), check the release (tools/release_check.sh: build, twine check, the
# wheel in a fresh environment runs the quickstart by name), run the serial tests, then the MPI
# tests under 2, 3 and 4 ranks (python -m mpi4py: a failure on one rank aborts the job, and
# pytest-timeout's thread method turns a hang into a failure).
# Usage: bash tools/test.sh [--no-lint] [pytest args for the serial run, e.g. -m "not slow" -x]
#        bash tools/test.sh --gpu [--bench] [pytest args]   the GPU tests instead (tools/test_gpu.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${1:-}" = "--gpu" ]; then shift; exec bash tools/test_gpu.sh "$@"; fi
LINT=1
if [ "${1:-}" = "--no-lint" ]; then
  LINT=0
  shift
fi
source tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$LINT" = 1 ]; then
  bash tools/lint.sh
fi
echo "[test] release check"
bash tools/release_check.sh
echo "[test] serial tests"
"$PY" -m pytest -q --timeout=600 --timeout-method=thread "$@"
for n in 2 3 4; do
  echo "[test] MPI tests on $n ranks"
  mpiexec -n "$n" "$PY" -m mpi4py -m pytest -q --with-mpi -m mpi --timeout=300 --timeout-method=thread tests/mpi
done
echo "[test] all green"

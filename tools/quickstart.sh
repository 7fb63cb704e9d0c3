#!/usr/bin/env bash
# Set up the environment and run the quickstart: 2 MPI ranks train CNN3 with PGPE over DeepPoly
# bounds on scikit-learn's bundled digits, write HDF5 checkpoints to runs/quickstart, and print
# the final natural and certified test accuracy. Extra arguments go to `mpigls train`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh
OUT="${OUT:-runs/quickstart}"
mpiexec -n 2 "$PY" -m mpi4py -m mpigls train configs/quickstart.yaml --out "$OUT" --set train.threads=1 "$@"
"$PY" -m mpigls inspect "$OUT/latest.h5"

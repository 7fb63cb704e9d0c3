#!/usr/bin/env bash
# One node or a host list, any MPI: N ranks train CONFIG into OUT (resumes if OUT has checkpoints).
# Usage: jobs/mpirun.sh N CONFIG OUT [mpigls train options...]
set -euo pipefail
N=${1:?ranks}; CONFIG=${2:?config}; OUT=${3:?output dir}; shift 3
exec mpirun -n "$N" python -m mpi4py -m mpigls train "$CONFIG" --out "$OUT" "$@"

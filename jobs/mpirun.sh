#!/usr/bin/env bash
# One node or a host list, any MPI: N ranks train CONFIG into OUT (resumes if OUT has checkpoints).
# Usage: jobs/mpirun.sh N CONFIG OUT [mpigls train options...]
# MPIGLS_ENV_SETUP: a file sourced first (module load, source VENV/bin/activate).
set -euo pipefail
if [[ -n "${MPIGLS_ENV_SETUP:-}" ]]; then  # the site's environment (module load, a virtual environment)
  # shellcheck disable=SC1090
  source "$MPIGLS_ENV_SETUP" || { echo "MPIGLS_ENV_SETUP=$MPIGLS_ENV_SETUP failed" >&2; exit 2; }
fi
N=${1:?ranks}; CONFIG=${2:?config}; OUT=${3:?output dir}; shift 3
exec mpirun -n "$N" python -m mpi4py -m mpigls train "$CONFIG" --out "$OUT" "$@"

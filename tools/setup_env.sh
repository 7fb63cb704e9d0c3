#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install mpigls with its test extras and the pip MPI.
# Usage: source tools/setup_env.sh   (sets VENV and PY; honours $MPIGLS_VENV, default ./.venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MPIGLS_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.mpigls-installed"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off
# pip -q still prints one warning per index location a machine-wide pip config lists but that lacks
# the package: harmless, hundreds of lines for torch's dependencies. Drop only those lines.
_setup_pip() {
  local rc=0
  # PYTHONWARNINGS reaches the build backend's process too: setuptools' editable-install notice
  # (a UserWarning) is a screenful on every fresh setup
  PYTHONWARNINGS="ignore::UserWarning" "$PY" -m pip -q "$@" 2> >(grep -v "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" >&2) \
    || rc=$?
  return "$rc"
}
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing mpigls[test,mpi,mpich,onnx,tensorboard,wandb] into $VENV (torch is large: a few minutes the first time)"
  _setup_pip install --upgrade pip
  _setup_pip install -e "$ROOT[test,mpi,mpich,onnx,tensorboard,wandb]"
  # an external complete verifier for the ONNX/VNN-LIB cross-check (tools/marabou_check.py, a slow test)
  _setup_pip install "maraboupy>=2.0" || echo "[setup] note: maraboupy not installed; the Marabou cross-check will be skipped"
  # the reference CROWN for cross-checks (tests/test_bounds_auto_lirpa.py, benchmarks/bench_bounds.py);
  # its pins (torch<1.13) are obsolete, benchmarks/auto_lirpa_compat.py shims it, so no dependencies
  _setup_pip install --no-deps "auto_LiRPA==0.3" "appdirs>=1.4" \
    || echo "[setup] note: auto_LiRPA not installed; the cross-check against it will be skipped"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VENV PY

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
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "[setup] installing mpigls[test,mpich] into $VENV (torch is large: a few minutes the first time)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e "$ROOT[test,mpich]"
  # the reference CROWN for cross-checks (tests/test_bounds_auto_lirpa.py, tools/bench_bounds.py);
  # its pins (torch<1.13) are obsolete, tools/auto_lirpa_compat.py shims it, so no dependencies
  "$PY" -m pip install -q --no-deps "auto_LiRPA==0.3" "appdirs>=1.4" \
    || echo "[setup] note: auto_LiRPA not installed; the cross-check against it will be skipped"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VENV PY

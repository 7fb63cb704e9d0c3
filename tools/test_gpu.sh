#!/usr/bin/env bash
# The GPU tests (pytest marker `gpu`, tests/gpu/) and, with --bench, the numerics benchmark.
# Usage: bash tools/test_gpu.sh [--bench] [pytest args]   (also: bash tools/test.sh --gpu ...)
#        MPIGLS_GPU_TEST_DEVICE=cpu bash tools/test_gpu.sh   the same tests with the CPU standing in for
#        the GPU (checks the tests' logic and the device paths anywhere; CUDA-only checks skip; ~2 min)
# Interpreter: $PY if set; else .device/device-env.sh when the checkout carries one (for an offline GPU
# node without a package index: a script that puts an interpreter with mpigls's dependencies on PATH,
# see docs/guide/cluster-gpu.md); else the project venv (tools/setup_env.sh). Fails when no CUDA GPU
# is visible, so that a run where every test skipped is never mistaken for a green GPU run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BENCH=0
if [ "${1:-}" = "--bench" ]; then BENCH=1; shift; fi
if [ -n "${PY:-}" ] && [ -x "$(command -v "$PY")" ]; then
  :   # an interpreter given by the caller: use it as it is
elif [ -f .device/device-env.sh ]; then
  set +eu +o pipefail   # device-env.sh is written for an interactive shell
  source .device/device-env.sh
  set -euo pipefail
  PY=python
else
  source tools/setup_env.sh
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "[test-gpu] $(date +%T) $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")')"
if [ "${MPIGLS_GPU_TEST_DEVICE:-}" != "cpu" ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "[test-gpu] error: torch sees no CUDA GPU here; run this on a GPU node (MPIGLS_GPU_TEST_DEVICE=cpu only checks the test code)" >&2
  exit 1
fi
TIMEOUT_ARGS=()
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then TIMEOUT_ARGS=(--timeout=900 --timeout-method=thread); fi
STANDIN=""
if [ "${MPIGLS_GPU_TEST_DEVICE:-}" = "cpu" ]; then STANDIN=" (CPU standing in for the GPU: the tests' logic only, not a GPU)"; fi
echo "[test-gpu] $(date +%T) pytest -m gpu tests/gpu$STANDIN"
"$PY" -m pytest -q -rs -m gpu "${TIMEOUT_ARGS[@]}" tests/gpu "$@"
if [ "$BENCH" = 1 ]; then
  echo "[test-gpu] $(date +%T) benchmark: python -m benchmarks.bench_numerics (record under benchmarks/records/)"
  "$PY" -m benchmarks.bench_numerics --device cuda --note "bash tools/test.sh --gpu --bench"
fi
echo "[test-gpu] $(date +%T) all green$STANDIN"

#!/usr/bin/env bash
# Lint and type check: ruff (rules in pyproject.toml [tool.ruff]) over the package, tests, benchmarks
# and tools, then mypy over mpigls/ and the benchmarks' shared helper ([tool.mypy]).
# Uses $PY (tools/setup_env.sh) or python3 from PATH.
# The tree is formatted with `ruff format .` (settings in pyproject.toml); `ruff format --check` keeps it so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
echo "[lint] ruff check"
"$PY" -m ruff check --quiet .
echo "[lint] ruff format --check"
"$PY" -m ruff format --check --quiet .
echo "[lint] mypy mpigls"
"$PY" -m mypy

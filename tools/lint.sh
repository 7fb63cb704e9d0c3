#!/usr/bin/env bash
# Lint and type check: ruff (rules in pyproject.toml [tool.ruff]) over the package, tests and tools,
# then mypy over mpigls/ ([tool.mypy]). Uses $PY (tools/setup_env.sh) or python3 from PATH.
# `ruff format --check` joins in once the tree has been formatted: whoever runs `ruff format .` over
# the whole tree also creates the marker file .ruff-formatted; until then formatting is not enforced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
echo "[lint] ruff check"
"$PY" -m ruff check --quiet .
if [ -f .ruff-formatted ]; then
  echo "[lint] ruff format --check"
  "$PY" -m ruff format --check --quiet .
fi
echo "[lint] mypy mpigls"
"$PY" -m mypy

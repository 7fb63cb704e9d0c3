#!/usr/bin/env bash
# Release check: what a user who installs mpigls from its wheel gets.
#   1. build the sdist and, from it, the wheel (python -m build, in this environment: no download);
#   2. twine check --strict both (metadata and the README as the long description);
#   3. the wheel holds every recipe of configs/ and job script of jobs/, and the license; the sdist
#      holds LICENSE, CITATION.cff and CHANGELOG.md;
#   4. install the wheel alone into a fresh virtual environment outside the checkout (its
#      dependencies come from this environment through a .pth line, so torch is not installed
#      again; mpigls itself only from the wheel), then, from a directory that is not the checkout:
#      `mpigls --version`, `mpigls recipes`, `mpigls train quickstart --max-generations 2`,
#      `mpigls inspect` of its checkpoint (the version stored), `mpigls recipes --jobs copy`.
# Usage: bash tools/release_check.sh   (PY: the Python of an environment with mpigls[test]; default python3)
# Keeps nothing: everything is built and run in a temporary directory.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/mpigls-release.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
say() { echo "[release] $*"; }
quiet() {  # run "$@" with its output in a log that is shown only if it fails
  local log="$TMP/step.log"
  if ! "$@" >"$log" 2>&1; then
    cat "$log" >&2
    say "FAILED: $*" >&2
    return 1
  fi
}

say "building sdist and wheel"
quiet env PYTHONWARNINGS="ignore::UserWarning" "$PY" -m build --no-isolation --outdir "$TMP/dist" "$ROOT"
WHEEL=$(ls "$TMP"/dist/*.whl)
SDIST=$(ls "$TMP"/dist/*.tar.gz)
say "built $(basename "$SDIST") and $(basename "$WHEEL")"

say "twine check --strict"
"$PY" -m twine --no-color check --strict "$SDIST" "$WHEEL"

say "contents: every recipe and job script in the wheel, license and citation in the sdist"
"$PY" - "$ROOT" "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

root, wheel, sdist = Path(sys.argv[1]), zipfile.ZipFile(sys.argv[2]), sys.argv[3]
in_wheel = set(wheel.namelist())
want = {f"mpigls/_recipes/{p.relative_to(root / 'configs').as_posix()}": p for p in (root / "configs").rglob("*.yaml")}
want |= {f"mpigls/_jobs/{p.name}": p for p in (root / "jobs").iterdir() if p.suffix in (".sh", ".sbatch")}
missing = sorted(set(want) - in_wheel)
differ = sorted(n for n in set(want) & in_wheel if wheel.read(n) != want[n].read_bytes())
licenses = [n for n in in_wheel if n.endswith(".dist-info/licenses/LICENSE")]
top = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
absent = sorted({"LICENSE", "CITATION.cff", "CHANGELOG.md"} - top)
if missing or differ or not licenses or absent:
    sys.exit(f"wheel lacks {missing} (differ: {differ}){'' if licenses else ' and LICENSE'}; sdist lacks {absent}")
print(f"wheel: the {len(want)} files of configs/ and jobs/ byte for byte, and {licenses[0]}")
print("sdist: LICENSE, CITATION.cff, CHANGELOG.md")
EOF

say "fresh virtual environment outside the checkout, mpigls only from the wheel"
"$PY" -m venv --without-pip "$TMP/venv"
VPY="$TMP/venv/bin/python"
# This environment's packages, as a plain path line: its own .pth files (an editable mpigls among
# them) are not processed, so the checkout never reaches the fresh environment's sys.path.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VSITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" >"$VSITE/_release_check_deps.pth"
quiet "$PY" -m pip --python "$VPY" install --no-deps --no-index --ignore-installed "$WHEEL"
mkdir "$TMP/elsewhere"
cd "$TMP/elsewhere"
run() { env -u PYTHONPATH OMP_NUM_THREADS=1 "$TMP/venv/bin/mpigls" "$@"; }
env -u PYTHONPATH "$VPY" - "$TMP/venv" "$ROOT" <<'EOF'
import sys
from pathlib import Path

import mpigls

venv, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
where = Path(mpigls.__file__).resolve()
print(f"mpigls {mpigls.__version__} imported from {where}")
if venv not in where.parents or root in where.parents:
    sys.exit(f"mpigls came from {where}, not from the wheel installed in {venv}")
if any(Path(p or ".").resolve() == root for p in sys.path):
    sys.exit(f"the checkout {root} is on sys.path")
EOF
VERSION=$(basename "$WHEEL" | cut -d- -f2)
say "mpigls --version"
run --version | tee "$TMP/version.txt"
[[ "$(cat "$TMP/version.txt")" == "mpigls $VERSION" ]] || { say "FAILED: --version is not $VERSION (the wheel's)" >&2; exit 1; }
say "mpigls recipes"
run recipes >"$TMP/recipes.txt"
head -n 12 "$TMP/recipes.txt"
echo "  ... ($(($(wc -l <"$TMP/recipes.txt") - 1)) in all)"
say "mpigls train quickstart --max-generations 2 (in $PWD)"
run train quickstart --max-generations 2 --out "$TMP/elsewhere/run" --set train.progress=false
run inspect "$TMP/elsewhere/run/latest.h5" --json >"$TMP/inspect.json"
"$VPY" - "$TMP/inspect.json" "$VERSION" <<'EOF'
import json, sys

summary, version = json.load(open(sys.argv[1])), sys.argv[2]
generation, stored = summary["generation"], summary["mpigls_version"]
print(f"checkpoint: generation {generation}, mpigls_version {stored}")
if generation != 2 or stored != version:
    sys.exit(f"expected generation 2 and mpigls_version {version}")
EOF
say "mpigls recipes --jobs copy paper.sh"
run recipes --jobs copy paper.sh jobs
bash -n jobs/paper.sh
say "release check passed"

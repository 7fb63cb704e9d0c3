#!/usr/bin/env bash
# Reproduce one row of the GLS paper's Tables 1-3: warm start -> training -> certification.
#
#   bash jobs/paper.sh ROW                 # ROW = a file name in configs/paper/ without .yaml
#   (installed from a wheel: `mpigls recipes --jobs copy paper.sh .` and `bash paper.sh ROW`; ROW as in
#   `mpigls recipes`, without the paper/ prefix)
#   NP=8 DATA=/scratch/datasets bash jobs/paper.sh mnist-0.1-cnn3-deeppoly-pgpe
#   SMOKE=1 bash jobs/paper.sh mnist-0.1-cnn3-deeppoly-pgpe   # minutes on a CPU: digits, 1 epoch, tiny popsize
#
# A PGPE row first runs (or reuses) its PGD warm start (the row named by model.init_from in its
# YAML), then trains with --set model.init_from=RUNS/<warm row>/latest.h5, then certifies the
# result (bounds, their union, and the complete verifier) into RUNS/ROW/certify.json.
# Resumable: every step is skipped when its output exists (RUNS/ROW/eval.json after training,
# RUNS/ROW/certify.json after certification) and an interrupted training resumes from
# RUNS/ROW/latest.h5 — just run the same command again (also after a SLURM requeue).
#
# Environment: NP ranks (default 1; mpiexec -n NP), RUNS (default runs/paper, or
# runs/paper-smoke with SMOKE=1), DATA (data.root; default: the YAML's, "data"), MPIEXEC
# (default mpiexec), PYTHON (default python), VERIFY_TIME (seconds per sample, default 60),
# CERT_ARGS (extra `mpigls certify` arguments, e.g. "--num-test 1000"), MPIGLS_ENV_SETUP (a file
# sourced first: module load, source VENV/bin/activate).
set -euo pipefail
if [[ -n "${MPIGLS_ENV_SETUP:-}" ]]; then  # the site's environment (module load, a virtual environment)
  # shellcheck disable=SC1090
  source "$MPIGLS_ENV_SETUP" || { echo "MPIGLS_ENV_SETUP=$MPIGLS_ENV_SETUP failed" >&2; exit 2; }
fi
ROW=${1:?usage: jobs/paper.sh ROW (a config name in configs/paper/)}
NP=${NP:-1}; PYTHON=${PYTHON:-python}; MPIEXEC=${MPIEXEC:-mpiexec}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [[ -d "$HERE/configs/paper" ]]; then  # in a checkout: its configs/paper/
  CONFIG="$HERE/configs/paper/$ROW.yaml"
  [[ -f "$CONFIG" ]] || { echo "jobs/paper.sh: no recipe $CONFIG; rows: $(ls "$HERE/configs/paper" | sed 's/\.yaml$//' | tr '\n' ' ')" >&2; exit 2; }
else  # a copy (mpigls recipes --jobs copy paper.sh DIR): the installed package's recipe
  CONFIG=$("$PYTHON" -m mpigls recipes path "paper/$ROW") || exit 2
fi
if [[ "${SMOKE:-0}" == 1 ]]; then RUNS=${RUNS:-runs/paper-smoke}; else RUNS=${RUNS:-runs/paper}; fi
VERIFY_TIME=${VERIFY_TIME:-60}
SETS=()
[[ -n "${DATA:-}" ]] && SETS+=(--set "data.root=$DATA")
CERT=(--verify --time-limit "$VERIFY_TIME" --pgd-restarts 5)
if [[ "${SMOKE:-0}" == 1 ]]; then
  # the same recipe, shrunk: bundled digits, 1 epoch, a tiny population; certify 8 samples
  for kv in data.name=digits data.num_train=128 data.num_test=16 train.epochs=1 train.batch_size=64 \
            train.checkpoint_every=2 optimizer.block_size=4 eval.num_test=8 eval.pgd_steps=3 \
            bound.anneal_epochs=0 bound.eps_schedule=constant train.progress=false; do SETS+=(--set "$kv"); done
  # keys only one optimizer has (another optimizer refuses them): PGPE's population
  PGPE_SMOKE="optimizer.popsize=8"
  if grep -Eq 'name: *pgpe\b' "$CONFIG"; then SETS+=(--set "$PGPE_SMOKE"); fi
  CERT=(--verify --time-limit 1 --pgd-restarts 1 --num-test 8)
fi
run() { if [[ "$NP" -gt 1 ]]; then "$MPIEXEC" -n "$NP" "$PYTHON" -m mpi4py -m mpigls "$@"; else "$PYTHON" -m mpigls "$@"; fi; }

WARM=$(sed -n 's#^ *model:.*init_from: *runs/paper/\([^/]*\)/latest.h5.*#\1#p; s#^ *init_from: *runs/paper/\([^/]*\)/latest.h5.*#\1#p' "$CONFIG" | head -n1)
if [[ -n "$WARM" ]]; then
  echo "== $ROW: warm start $WARM"
  RUNS="$RUNS" SMOKE="${SMOKE:-0}" NO_CERTIFY=1 bash "$0" "$WARM"
  SETS+=(--set "model.init_from=$RUNS/$WARM/latest.h5")
fi
OUT="$RUNS/$ROW"
if [[ -f "$OUT/eval.json" ]]; then
  echo "== $ROW: trained ($OUT/eval.json exists)"
else
  echo "== $ROW: training into $OUT"
  run train "$CONFIG" --out "$OUT" "${SETS[@]}"
fi
if [[ "${NO_CERTIFY:-0}" != 1 ]]; then
  if [[ -f "$OUT/certify.json" ]]; then
    echo "== $ROW: certified ($OUT/certify.json exists)"
  else
    echo "== $ROW: certifying"
    run certify "$OUT/latest.h5" --json --results "$OUT/certify.json" "${CERT[@]}" ${CERT_ARGS:-} "${SETS[@]}"
  fi
fi

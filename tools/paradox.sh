#!/usr/bin/env bash
# The certified-training paradox in miniature, on the bundled digits (eps 0.2, CNN3):
# GRAD + IBP, GRAD + DeepPoly, PGPE + DeepPoly and RGS + DeepPoly with the same budget of 270
# epochs, each certified with every bound, their union and the complete verifier; prints the table.
#
#   bash tools/paradox.sh                       # everything, resumable (run again to continue)
#   OUT=runs/paradox JOBS=2 VERIFY_TIME=30 bash tools/paradox.sh
#   PGPE_SETS="--set optimizer.popsize=64" bash tools/paradox.sh   # tune the GLS rows
#
# Order: GRAD + IBP and GRAD + DeepPoly (270 epochs) in parallel (JOBS, default 2, one thread
# each); GRAD + DeepPoly stops once at generation WARM_GEN (2600 = epoch 236.4) and keeps that
# checkpoint as OUT/warm-grad-deeppoly.h5, the warm start of PGPE + DeepPoly and RGS + DeepPoly,
# which then train the remaining 34 epochs (configs/digits-paradox/). Every step is skipped when
# its result exists (eval.json, certify.json); an interrupted training resumes.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
CFG="$HERE/configs/digits-paradox"
OUT=${OUT:-runs/paradox}; JOBS=${JOBS:-2}; WARM_GEN=${WARM_GEN:-2600}; VERIFY_TIME=${VERIFY_TIME:-30}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
read -r -a PGPE_EXTRA <<< "${PGPE_SETS:-}"
read -r -a RGS_EXTRA <<< "${RGS_SETS:-}"
read -r -a ALL_EXTRA <<< "${EXTRA_SETS:-}"   # e.g. a smoke run: EXTRA_SETS="--set train.epochs=1 ..."
read -r -a CERT_EXTRA <<< "${CERT_ARGS:-}"   # e.g. CERT_ARGS="--num-test 100"

train() {  # ROW CONFIG [args...]: train to the end unless OUT/ROW/eval.json exists
  local row=$1 cfg=$2; shift 2
  [[ -f "$OUT/$row/eval.json" ]] && return 0
  "$PYTHON" -m mpigls train "$cfg" --out "$OUT/$row" --set train.progress=false "${ALL_EXTRA[@]}" "$@" > "$OUT/$row.log" 2>&1
}
grad_deeppoly() {
  if [[ ! -f "$OUT/warm-grad-deeppoly.h5" ]]; then
    "$PYTHON" -m mpigls train "$CFG/grad-deeppoly.yaml" --out "$OUT/grad-deeppoly" --set train.progress=false \
      "${ALL_EXTRA[@]}" --max-generations "$WARM_GEN" --no-eval > "$OUT/grad-deeppoly.log" 2>&1
    cp "$OUT/grad-deeppoly/latest.h5" "$OUT/warm-grad-deeppoly.h5"
  fi
  train grad-deeppoly "$CFG/grad-deeppoly.yaml"
}
certify() {  # ROW
  local row=$1
  [[ -f "$OUT/$row/certify.json" ]] && return 0
  "$PYTHON" -m mpigls certify "$OUT/$row/latest.h5" --methods ibp,deeppoly --pgd-restarts 3 --verify \
    --time-limit "$VERIFY_TIME" --results "$OUT/$row/certify.json" --json "${CERT_EXTRA[@]}" > "$OUT/$row.certify.log" 2>&1
}

pair() {  # run two steps, in parallel when JOBS >= 2; fail if either fails
  if [[ "$JOBS" -lt 2 ]]; then "$1"; "$2"; return; fi
  "$1" & local a=$!
  "$2" & local b=$!
  wait "$a"; wait "$b"
}
grad_ibp() { train grad-ibp "$CFG/grad-ibp.yaml"; }
pgpe() { train pgpe-deeppoly "$CFG/pgpe-deeppoly.yaml" "${WARM[@]}" "${PGPE_EXTRA[@]}"; }
rgs() { train rgs-deeppoly "$CFG/rgs-deeppoly.yaml" "${WARM[@]}" "${RGS_EXTRA[@]}"; }

echo "[paradox] GRAD rows -> $OUT (logs: $OUT/*.log)"
pair grad_ibp grad_deeppoly
WARM=(--set "model.init_from=$OUT/warm-grad-deeppoly.h5")
echo "[paradox] GLS rows from $OUT/warm-grad-deeppoly.h5"
pair pgpe rgs
echo "[paradox] certifying (complete verifier: $VERIFY_TIME s per sample)"
for row in grad-ibp grad-deeppoly pgpe-deeppoly rgs-deeppoly; do certify "$row"; done
"$PYTHON" "$HERE/tools/paradox_table.py" "$OUT"

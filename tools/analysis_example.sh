#!/usr/bin/env bash
# The analysis example of docs/guide/analysis.md: four short digits runs (IBP and DeepPoly, each with GRAD and
# PGPE; eps 0.05, validation every 10 generations), then `mpigls plot`, `mpigls report` and
# `mpigls tightness` on them. Outputs go to runs/analysis/ (OUT=... to change); the plot to
# docs/example-plot.png when DOCS=1. Minutes on a laptop (one process per run; MPI works too).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python}"
OUT="${OUT:-runs/analysis}"
COMMON=(--set train.progress=false --set train.threads=1 --set train.log_every=100
        --set eval.every=10 --set eval.num_val=200 --set eval.pgd_steps=10)
for method in ibp deeppoly; do
  "$PY" -m mpigls train configs/digits-grad-ibp.yaml --out "$OUT/grad-$method" "${COMMON[@]}" \
      --set bound.method=$method --set train.epochs=20
  "$PY" -m mpigls train configs/quickstart.yaml --out "$OUT/pgpe-$method" "${COMMON[@]}" \
      --set bound.method=$method
done
RUNS=("$OUT"/grad-ibp "$OUT"/grad-deeppoly "$OUT"/pgpe-ibp "$OUT"/pgpe-deeppoly)
PLOT="$OUT/curves.png"
[[ "${DOCS:-0}" == 1 ]] && PLOT=docs/example-plot.png
"$PY" -m mpigls plot "${RUNS[@]}" --out "$PLOT"
# the committed picture: 8-bit palette PNG (a third of the size, looks the same)
[[ "${DOCS:-0}" == 1 ]] && "$PY" -c "from PIL import Image; import sys; Image.open(sys.argv[1]).convert('RGB').quantize(128).save(sys.argv[1], optimize=True)" "$PLOT"
"$PY" -m mpigls report "${RUNS[@]}" --out "$OUT/table.md"
"$PY" -m mpigls report "${RUNS[@]}" --format csv --out "$OUT/table.csv" > /dev/null
"$PY" -m mpigls tightness "$OUT/pgpe-deeppoly/latest.h5" --out "$OUT/tightness-pgpe-deeppoly.png" --max-eps 0.1
"$PY" -m mpigls tightness "$OUT/grad-ibp/latest.h5" --out "$OUT/tightness-grad-ibp.png" --max-eps 0.1

#!/bin/bash
# Every scaling measurement on one machine, one command (2+ cores, no GPU needed; docs/benchmarks.md):
#   bash benchmarks/scaling_here.sh [OUTDIR]   (default benchmarks/records/<date>-scaling; ~60 min on 2 cores)
# PGPE + IBP on the bundled digits, 1 thread per rank, ranks 1 and 2, REPEATS interleaved repeats with
# the machine's ceiling (strong: same P, theta must be identical; weak: P = 32 per rank); the host
# allocator A/B; the chunked runs, the tell and noise benchmarks, the model, the per-rank work.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/records/$(date -u +%F)-scaling}
PY=${PYTHON:-python}
RANKS=${RANKS:-1,2}
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
C=(--set bound.method=ibp --set bound.eps_schedule=constant --set optimizer.block_size=8)
R=(--ranks "$RANKS" --repeats "${REPEATS:-3}" --ceiling)
# strong (P=64, theta must be identical) and weak (P=32 per rank), with the machine's ceiling
for m in cnn3 cnn5; do
  $PY -m benchmarks.scaling --mode both "${R[@]}" --generations 40 --skip 5 --weak-popsize-per-rank 32 \
    --set model.name=$m "${C[@]}" --set optimizer.popsize=64 --set train.batch_size=16 \
    --label "PGPE+IBP $m digits P=64 B=16" --out "$OUT/strong-weak-$m"
done
$PY -m benchmarks.scaling --mode both "${R[@]}" --generations 14 --skip 3 --weak-popsize-per-rank 32 \
  --set model.name=cnn7 "${C[@]}" --set optimizer.popsize=64 --set train.batch_size=16 \
  --label "PGPE+IBP cnn7 digits P=64 B=16" --out "$OUT/strong-weak-cnn7"
for m in cnn3 cnn5; do
  $PY -m benchmarks.scaling --mode strong "${R[@]}" --generations 30 --skip 5 \
    --set model.name=$m "${C[@]}" --set optimizer.popsize=256 --set train.batch_size=64 \
    --label "PGPE+IBP $m digits P=256 B=64" --out "$OUT/strong-$m-256"
done
# the host allocator setting, paired (mpigls/run/hostmem.py)
$PY -m benchmarks.bench_hostmem --ranks "$RANKS" --repeats "${REPEATS:-3}" --generations 40 --out "$OUT/hostmem-cnn3.json" \
  --set model.name=cnn3 "${C[@]}" --set optimizer.popsize=64 --set train.batch_size=16
$PY -m benchmarks.bench_hostmem --ranks "$RANKS" --repeats "${REPEATS:-3}" --out "$OUT/hostmem-cnn5.json" \
  --set model.name=cnn5 "${C[@]}" --set optimizer.popsize=256 --set train.batch_size=64
# one pair block split into 2 example chunks (optimizer.batch_chunks): work for a second rank with 1 block
for m in cnn5 cnn7; do
  $PY -m benchmarks.scaling --mode strong --ranks "$RANKS" --generations 20 --skip 4 --repeats "${REPEATS:-3}" \
    --set model.name=$m --set bound.method=ibp --set bound.eps_schedule=constant --set optimizer.popsize=64 \
    --set train.batch_size=16 --set optimizer.block_size=32 --set optimizer.batch_chunks=2 \
    --label "PGPE+IBP $m digits P=64 B=16 block 32 x 2 chunks" --out "$OUT/strong-chunks-$m"
done
$PY -m benchmarks.bench_pgpe_update --model cnn5 --shape 1,28,28 --popsize 256 --ranks 1,2,8,64 --out "$OUT/pgpe_update_cnn5.json"
$PY -m benchmarks.bench_noise --dims 165850 --block 16 --out "$OUT/noise.json"
$PY -m benchmarks.scaling_model --out "$OUT/scaling_model.json"
# per-rank work of a generation measured in one process (robust to other jobs loading the cores)
for m in cnn3 cnn5 cnn7; do
  $PY -m benchmarks.bench_rank_work --model $m --popsize 64 --batch 16 --bound ibp --ranks 1,2 --repeat 7 \
    --out "$OUT/rank_work_$m.json"
done
for m in cnn5 cnn7; do
  $PY -m benchmarks.bench_rank_work --model $m --popsize 64 --batch 16 --block-size 32 --batch-chunks 2 --bound ibp \
    --ranks 1,2 --repeat 7 --out "$OUT/rank_work_chunks_$m.json"
done

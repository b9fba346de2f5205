#!/usr/bin/env bash
# Retrain every drafter from scratch on the committed target, then rebuild the acceptance
# table. Same data (target replies regenerated at T=1) for every method; EPOCHS passes, and
# LONG_EPOCHS for the serving default (dspark-d2), dspark-d1 and MTP-1.
#   bash scripts/train_drafters.sh            # ~110 min on 2 CPU cores
# Env: WORK (default runs/drafters), OUT (checkpoints/drafters), EPOCHS (3), RESULTS (docs/results),
#      LONG_EPOCHS (6: the serving default dspark-d2 and MTP-1 since session 28, dspark-d1 since 29)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK=${WORK:-runs/drafters}
OUT=${OUT:-checkpoints/drafters}
EPOCHS=${EPOCHS:-3}
LONG_EPOCHS=${LONG_EPOCHS:-6}
RESULTS=${RESULTS:-docs/results}
mkdir -p "$WORK"
common=(--work-dir "$WORK" --epochs "$EPOCHS" --no-progress)

# MTP-1 first: its call also regenerates the replies and builds the shared feature cache.
dspark train drafter --method mtp --out "$OUT/mtp" "${common[@]}" --epochs "$LONG_EPOCHS"

# Two queues of one thread each (two cores).
queue_a() {
  dspark train drafter --method dspark --out "$OUT/dspark" "${common[@]}"
  dspark train drafter --method dflash --name dflash-l1 --alpha-ce 0.1 --alpha-l1 0.9 \
    --out "$OUT/dflash-l1" "${common[@]}"
  # drafters sized to the target: 1 backbone layer
  dspark train drafter --method dspark --name dspark-d1 --num-layers 1 --out "$OUT/dspark-d1" \
    "${common[@]}" --epochs "$LONG_EPOCHS"
  dspark train drafter --method dflash --name dflash-d1 --num-layers 1 --out "$OUT/dflash-d1" \
    "${common[@]}"
}
queue_b() {
  dspark train drafter --method dflash --out "$OUT/dflash" "${common[@]}"
  dspark train drafter --method dspark --name dspark-ce --alpha-ce 1.0 --alpha-l1 0.0 \
    --out "$OUT/dspark-ce" "${common[@]}"
  dspark train drafter --method eagle3 --out "$OUT/eagle3" "${common[@]}"
  # 2 backbone layers
  dspark train drafter --method dspark --name dspark-d2 --num-layers 2 --out "$OUT/dspark-d2" \
    "${common[@]}" --epochs "$LONG_EPOCHS"
  dspark train drafter --method dflash --name dflash-d2 --num-layers 2 --out "$OUT/dflash-d2" \
    "${common[@]}"
}
OMP_NUM_THREADS=1 queue_a > "$WORK/queue_a.log" 2>&1 &
a=$!
OMP_NUM_THREADS=1 queue_b > "$WORK/queue_b.log" 2>&1 &
b=$!
wait $a
wait $b

# the draft vocabulary of the parallel drafters: the target's tokens ranked by how often
# its regenerated replies use them (the same data, from the cache)
dspark train draft-vocab --work-dir "$WORK" --drafters "$OUT" --no-progress

dspark eval --drafters "$OUT" --out "$RESULTS" --jobs 2 --no-progress

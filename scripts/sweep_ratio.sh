#!/usr/bin/env bash
# The paper's update-ratio sweep on the embedded default: Dowser masks with rho = 0.05 .. 1.0 on the
# last 20 decoder layers, beside Full-FT (the same layers, dense: rho 1 without a mask), same data and
# steps; a chart of U, D and H against rho. Not run by CI (about an hour).
#   scripts/sweep_ratio.sh [OUT]          (env: DOWSER, DEMO_STEPS, DEMO_TASKS, RATIOS)
set -euo pipefail
OUT=${1:-sweep-ratio}
source "$(dirname "$0")/common.sh"
RATIOS=${RATIOS:-"0.05 0.1 0.2 0.5 1.0"}
data_and_scores
run_stage run-full-ft "$OUT/runs/full-ft-1.0/run.yaml" "$OUT/data/train.json" \
    $DOWSER finetune "$MODEL" "${TRAIN[@]}" --tune-layers last:20 --out "$OUT/runs/full-ft-1.0"
RUNS=("$OUT/runs/full-ft-1.0")
for r in $RATIOS; do
    run_stage "mask-$r" "$OUT/mask-$r.safetensors" "$OUT/scores.safetensors" \
        $DOWSER mask "$OUT/scores.safetensors" --ratio "$r" --layers last:20 --out "$OUT/mask-$r.safetensors"
    run_stage "run-dowser-$r" "$OUT/runs/dowser-$r/run.yaml" "$OUT/data/train.json $OUT/mask-$r.safetensors" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" --mask "$OUT/mask-$r.safetensors" --out "$OUT/runs/dowser-$r"
    RUNS+=("$OUT/runs/dowser-$r")
done
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" > /dev/null
"$PY" scripts/plot_sweep.py "$OUT/report" --xlabel "update ratio rho" --out "$OUT/sweep_ratio.png"

#!/usr/bin/env bash
# The paper's depth sweep on the embedded default: Full-FT and Dowser (rho 0.1) tuning the last N
# decoder layers, N = 4 .. 30 (all), same data and steps; a chart of U, D and H against N.
# Reuses the demo's data and scores when OUT is the demo's directory. Not run by CI (about an hour).
#   scripts/sweep_depth.sh [OUT]          (env: DOWSER, DEMO_STEPS, DEMO_TASKS, DEPTHS)
set -euo pipefail
OUT=${1:-sweep-depth}
source "$(dirname "$0")/common.sh"
DEPTHS=${DEPTHS:-"4 8 12 16 20 30"}
data_and_scores
RUNS=()
for n in $DEPTHS; do
    run_stage "mask-last$n" "$OUT/mask-last$n.safetensors" "$OUT/scores.safetensors" \
        $DOWSER mask "$OUT/scores.safetensors" --ratio "$RATIO" --layers "last:$n" --out "$OUT/mask-last$n.safetensors"
    run_stage "run-full-ft-$n" "$OUT/runs/full-ft-$n/run.yaml" "$OUT/data/train.json" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" --tune-layers "last:$n" --out "$OUT/runs/full-ft-$n"
    run_stage "run-dowser-$n" "$OUT/runs/dowser-$n/run.yaml" "$OUT/data/train.json $OUT/mask-last$n.safetensors" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" --mask "$OUT/mask-last$n.safetensors" --out "$OUT/runs/dowser-$n"
    RUNS+=("$OUT/runs/full-ft-$n" "$OUT/runs/dowser-$n")
done
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" > /dev/null
"$PY" scripts/plot_sweep.py "$OUT/report" --xlabel "tuned decoder layers (from the top)" --out "$OUT/sweep_depth.png"

#!/usr/bin/env bash
# The paper's update-ratio sweep on the embedded default: Dowser masks with rho = 0.05 .. 1.0 on the
# last 20 decoder layers, beside Full-FT (the same layers, dense: rho 1 without a mask), same data and
# steps; a chart of U, D and H against rho. Not run by CI (about an hour).
#   scripts/sweep_ratio.sh [OUT]          (env: DOWSER, DEMO_STEPS, DEMO_TASKS, RATIOS)
set -euo pipefail
OUT=${1:-sweep-ratio}
DOWSER=${DOWSER:-dowser}
MODEL=${DEMO_MODEL:-smol-llava}
STEPS=${DEMO_STEPS:-48}
TASKS=${DEMO_TASKS:-configs/tasks/demo.yaml}
RATIOS=${RATIOS:-"0.05 0.1 0.2 0.5 1.0"}
mkdir -p "$OUT/runs"
[[ -f "$OUT/data/train.json" ]] || $DOWSER make-data digits --out "$OUT/data"
[[ -f "$OUT/scores.safetensors" ]] || $DOWSER probe "$MODEL" --samples 16 --out "$OUT/scores.safetensors"
TRAIN=(--data "$OUT/data/train.json" --config configs/recipes/cpu-small.yaml --max-steps "$STEPS" --batch-size 4
       --lr 1e-4 --projector-lr 1e-3 --train-projector)
[[ -f "$OUT/runs/full-ft-1.0/run.yaml" ]] || $DOWSER finetune "$MODEL" "${TRAIN[@]}" --tune-layers last:20 \
    --out "$OUT/runs/full-ft-1.0"
RUNS=("$OUT/runs/full-ft-1.0")
for r in $RATIOS; do
    [[ -f "$OUT/mask-$r.safetensors" ]] || $DOWSER mask "$OUT/scores.safetensors" --ratio "$r" --out "$OUT/mask-$r.safetensors"
    [[ -f "$OUT/runs/dowser-$r/run.yaml" ]] || $DOWSER finetune "$MODEL" "${TRAIN[@]}" --mask "$OUT/mask-$r.safetensors" \
        --out "$OUT/runs/dowser-$r"
    RUNS+=("$OUT/runs/dowser-$r")
done
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" > /dev/null
PY=${PYTHON:-$(dirname "$(command -v "${DOWSER%% *}")")/python}
[[ -x "$PY" ]] || PY=python3
"$PY" scripts/plot_sweep.py "$OUT/report" --xlabel "update ratio rho" --out "$OUT/sweep_ratio.png"

#!/usr/bin/env bash
# The paper's depth sweep on the embedded default: Full-FT and Dowser (rho 0.1) tuning the last N
# decoder layers, N = 4 .. 30 (all), same data and steps; a chart of U, D and H against N.
# Reuses the demo's data and scores when OUT is the demo's directory. Not run by CI (about an hour).
#   scripts/sweep_depth.sh [OUT]          (env: DOWSER, DEMO_STEPS, DEMO_TASKS, DEPTHS)
set -euo pipefail
OUT=${1:-sweep-depth}
DOWSER=${DOWSER:-dowser}
MODEL=${DEMO_MODEL:-smol-llava}
STEPS=${DEMO_STEPS:-48}
TASKS=${DEMO_TASKS:-configs/tasks/demo.yaml}
DEPTHS=${DEPTHS:-"4 8 12 16 20 30"}
mkdir -p "$OUT/runs"
[[ -f "$OUT/data/train.json" ]] || $DOWSER make-data digits --out "$OUT/data"
[[ -f "$OUT/scores.safetensors" ]] || $DOWSER probe "$MODEL" --samples 16 --out "$OUT/scores.safetensors"
TRAIN=(--data "$OUT/data/train.json" --config configs/recipes/cpu-small.yaml --max-steps "$STEPS" --batch-size 4
       --lr 1e-4 --projector-lr 1e-3 --train-projector)
RUNS=()
for n in $DEPTHS; do
    [[ -f "$OUT/mask-last$n.safetensors" ]] || $DOWSER mask "$OUT/scores.safetensors" --ratio 0.1 --layers "last:$n" \
        --out "$OUT/mask-last$n.safetensors"
    [[ -f "$OUT/runs/full-ft-$n/run.yaml" ]] || $DOWSER finetune "$MODEL" "${TRAIN[@]}" --tune-layers "last:$n" \
        --out "$OUT/runs/full-ft-$n"
    [[ -f "$OUT/runs/dowser-$n/run.yaml" ]] || $DOWSER finetune "$MODEL" "${TRAIN[@]}" \
        --mask "$OUT/mask-last$n.safetensors" --out "$OUT/runs/dowser-$n"
    RUNS+=("$OUT/runs/full-ft-$n" "$OUT/runs/dowser-$n")
done
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" > /dev/null
PY=${PYTHON:-$(dirname "$(command -v "${DOWSER%% *}")")/python}
[[ -x "$PY" ]] || PY=python3
"$PY" scripts/plot_sweep.py "$OUT/report" --xlabel "tuned decoder layers (from the top)" --out "$OUT/sweep_depth.png"

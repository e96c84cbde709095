#!/usr/bin/env bash
# Where the choice of weights matters: masks of the dowser, random and magnitude strategies at
# rho = 0.02 .. 0.5 on the last 20 decoder layers, beside Full-FT (rho 1, dense) and attention-only
# tuning (q/k/v/o densely: its own trainable fraction), each over SEEDS (data order; the probe's seed
# for dowser's scores; the random mask's seed), same data and steps; a chart of U, D, H and drift
# against rho with error bars (± sd over seeds) and the table of means. Not run by CI (about 2 hours
# on 2 CPU cores with the defaults).
#   scripts/sweep_ratio.sh [OUT]          (env: DOWSER, DEMO_STEPS, DEMO_TASKS, RATIOS, STRATEGIES, SEEDS)
set -euo pipefail
OUT=${1:-sweep-ratio}
source "$(dirname "$0")/common.sh"
RATIOS=${RATIOS:-"0.02 0.05 0.1 0.25 0.5"}
STRATEGIES=${STRATEGIES:-"dowser random magnitude"}
SEEDS=${SEEDS:-"0 1"}
data_and_scores
RUNS=()
tune() {  # tune NAME SEED "INPUTS" ARGS...
    local name=$1 seed=$2 inputs=$3
    shift 3
    run_stage "run-$name" "$OUT/runs/$name/run.yaml" "$OUT/data/train.json $inputs" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" --tune-layers last:20 --seed "$seed" "$@" --out "$OUT/runs/$name"
    RUNS+=("$OUT/runs/$name")
}
for seed in $SEEDS; do
    scores_for "$seed"
    tune "full-ft-1.0-s$seed" "$seed" "" --method full-ft
    tune "attn-only-0.25-s$seed" "$seed" "" --method full-ft --targets attn --freeze-norms
    for s in $STRATEGIES; do
        for r in $RATIOS; do
            m="$OUT/mask-$s-$r-s$seed.safetensors"
            run_stage "mask-$s-$r-s$seed" "$m" "$SCORES" \
                $DOWSER mask "$SCORES" --ratio "$r" --strategy "$s" --layers last:20 --seed "$seed" --out "$m"
            tune "$s-$r-s$seed" "$seed" "$m" --mask "$m"
        done
    done
done
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" --batch-size 16 > /dev/null
"$PY" scripts/plot_sweep.py "$OUT/report" --xlabel "update ratio rho (trainable fraction)" --out "$OUT/sweep_ratio.png" \
    | tee "$OUT/sweep_ratio.md"

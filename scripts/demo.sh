#!/usr/bin/env bash
# Model-Dowser against Full-FT on the embedded default (smol-llava), end to end, on a CPU, no downloads:
#   make-data -> probe -> mask (dowser, magnitude, random) -> finetune (Full-FT + the three masks)
#   -> eval-forgetting (digits downstream; SmolLM2's facts and drift upstream)
# A plain pipeline of the four subcommands: adapt it for a cluster by changing the model, data,
# recipe and sizes below (see configs/recipes/paper.yaml for the paper's settings).
#
#   scripts/demo.sh [OUT]            everything goes under OUT (default demo-out/)
#
# Scaled down from the paper only where a 2-core CPU and a 15-minute budget demand it:
#   probe  K = 16 samples (paper 64), B 4, M 8, text-only probes, all layers (as in the paper)
#   tune   the last 20 of 30 decoder layers (the paper's 20), rho 0.1 (the paper's); STEPS optimiser
#          steps of 4 examples (the paper: 5 epochs of a full dataset), lr 1e-4 (paper 2e-5 over far
#          more steps), cosine with 3 % warm-up, AdamW, fp32 on CPU.
# smol-llava's vision tower and projector are freshly initialised (seeded): the projector holds no
# pretrained knowledge to protect, so every method trains it densely, at its own higher lr; the masks
# only decide which decoder weights may move.
# Re-running reuses every finished stage whose inputs (files and command) are unchanged.
set -euo pipefail

OUT=${1:-${DEMO_OUT:-demo-out}}
DOWSER=${DOWSER:-dowser}
MODEL=${DEMO_MODEL:-smol-llava}
STEPS=${DEMO_STEPS:-48}
PROBE_SAMPLES=${DEMO_PROBE_SAMPLES:-16}
TASKS=${DEMO_TASKS:-configs/tasks/demo.yaml}
RATIO=0.1
mkdir -p "$OUT/.stamps"
START=$(date +%s)

# run_stage NAME OUTPUT "INPUT FILES" CMD...: skip when OUTPUT exists and the command and inputs'
# sha256 are those recorded when it was made.
run_stage() {
    local name=$1 output=$2 inputs=$3
    shift 3
    local key
    key=$( { echo "$*"; for f in $inputs; do sha256sum "$f" | cut -d' ' -f1; done; } | sha256sum | cut -d' ' -f1)
    if [[ -e "$output" && -f "$OUT/.stamps/$name" && "$(cat "$OUT/.stamps/$name")" == "$key" ]]; then
        echo "== $name: reusing $output (inputs unchanged)" >&2
        return
    fi
    echo "== $name" >&2
    rm -rf "$output" "$OUT/.stamps/$name"
    "$@"
    echo "$key" > "$OUT/.stamps/$name"
}

# 1. the downstream task: scikit-learn digits, a training split and a held-out test split
run_stage data "$OUT/data/train.json" "" \
    $DOWSER make-data digits --out "$OUT/data"

# 2. data-free importance, once per model
run_stage probe "$OUT/scores.safetensors" "" \
    $DOWSER probe "$MODEL" --samples "$PROBE_SAMPLES" --batch-size 4 --probes 8 --out "$OUT/scores.safetensors"

# 3. which weights may train: dowser and two baselines at the same rho and layers
for strategy in dowser magnitude random; do
    run_stage "mask-$strategy" "$OUT/mask-$strategy.safetensors" "$OUT/scores.safetensors" \
        $DOWSER mask "$OUT/scores.safetensors" --ratio "$RATIO" --strategy "$strategy" \
        --out "$OUT/mask-$strategy.safetensors"
done

# 4. fine-tune: same data, layers, steps and optimiser for every method
TRAIN=(--data "$OUT/data/train.json" --config configs/recipes/cpu-small.yaml --max-steps "$STEPS" --batch-size 4
       --lr 1e-4 --projector-lr 1e-3 --train-projector --tune-layers last:20)
run_stage run-full-ft "$OUT/runs/full-ft/run.yaml" "$OUT/data/train.json" \
    $DOWSER finetune "$MODEL" "${TRAIN[@]}" --out "$OUT/runs/full-ft"
for strategy in dowser magnitude random; do
    run_stage "run-$strategy" "$OUT/runs/$strategy/run.yaml" "$OUT/data/train.json $OUT/mask-$strategy.safetensors" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" --mask "$OUT/mask-$strategy.safetensors" --out "$OUT/runs/$strategy"
done

# 5. what each run learnt (D) and forgot (U), with H; cached per model and task, so this is cheap
#    to repeat
echo "== eval-forgetting" >&2
$DOWSER eval-forgetting --base "$MODEL" "$OUT/runs/full-ft" "$OUT/runs/dowser" "$OUT/runs/magnitude" \
    "$OUT/runs/random" --tasks "$TASKS" --out "$OUT/report" > /dev/null

cat "$OUT/report/report.md"
echo
echo "demo finished in $(( $(date +%s) - START )) s; everything is under $OUT/:"
echo "  report   $OUT/report/report.md, $OUT/report/report.yaml, chart $OUT/report/report.png"
echo "  runs     $OUT/runs/{full-ft,dowser,magnitude,random} (delta.safetensors, run.yaml)"
echo "  masks    $OUT/mask-{dowser,magnitude,random}.safetensors; scores $OUT/scores.safetensors"

#!/usr/bin/env bash
# Every method the toolkit runs, on the embedded default, under the same data, tuned layers, steps,
# optimiser and evaluation; prints the forgetting report and each method's costs.
#   mask strategies  dowser magnitude wanda random inverse   (dowser mask, then finetune --mask)
#   training-time    full-ft spider lora                     (finetune --method)
#   post-hoc         dare tailor graft                       (dowser merge of the Full-FT run)
#
#   scripts/compare_methods.sh [OUT]      (env: METHODS, DOWSER, DEMO_STEPS, DEMO_PROBE_SAMPLES, DEMO_TASKS,
#                                          CALIB_SAMPLES)
# About 30 minutes on 2 CPU cores for all of them; `make demo` runs a subset through this script.
# Finished stages are reused when their command and inputs are unchanged.
set -euo pipefail
OUT=${1:-${DEMO_OUT:-compare-out}}
source "$(dirname "$0")/common.sh"
METHODS=${METHODS:-"full-ft dowser magnitude wanda random spider lora dare tailor graft"}
LAYERS=(--tune-layers last:20)   # the paper's 20 tuned layers (of smol-llava's 30)
CALIB_SAMPLES=${CALIB_SAMPLES:-128}              # Model Tailor's calibration examples (its paper: 128)
GRAFT_STEPS=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))  # Grafting's mask steps: half the fine-tuning's
START=$(date +%s)
data_and_scores

finetune_run() {  # finetune_run NAME "INPUT FILES" ARGS...
    local name=$1 inputs=$2
    shift 2
    run_stage "run-$name" "$OUT/runs/$name/run.yaml" "$OUT/data/train.json $inputs" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" "${LAYERS[@]}" "$@" --out "$OUT/runs/$name"
}

merge_run() {  # merge_run NAME ARGS...: a post-hoc method applied to the Full-FT run
    local name=$1
    shift
    [[ -n ${FULL_FT_DONE:-} ]] || { finetune_run full-ft "" --method full-ft; FULL_FT_DONE=1; }
    run_stage "merge-$name" "$OUT/runs/$name/run.yaml" "$OUT/runs/full-ft/delta.safetensors $OUT/data/train.json" \
        $DOWSER merge "$OUT/runs/full-ft" --method "$name" "$@" --out "$OUT/runs/$name"
}

RUNS=()
for m in $METHODS; do
    case $m in
        dowser|magnitude|wanda|random|inverse)
            run_stage "mask-$m" "$OUT/mask-$m.safetensors" "$OUT/scores.safetensors" \
                $DOWSER mask "$OUT/scores.safetensors" --ratio "$RATIO" --strategy "$m" --layers last:20 \
                --out "$OUT/mask-$m.safetensors"
            finetune_run "$m" "$OUT/mask-$m.safetensors" --mask "$OUT/mask-$m.safetensors" ;;
        full-ft)
            finetune_run full-ft "" --method full-ft
            FULL_FT_DONE=1 ;;
        spider)
            finetune_run spider "" --method spider ;;
        lora)  # rank 8 adapters; LoRA's usual 10x higher lr than dense fine-tuning
            finetune_run lora "" --method lora --lora-r 8 --lora-alpha 16 --lr 1e-3 ;;
        dare)
            merge_run dare --p 0.9 --seed 0 ;;
        tailor)  # calibration samples of the downstream data, 10 % of the delta kept (rho's 10 %)
            merge_run tailor --data "$OUT/data/train.json" --calib-samples "$CALIB_SAMPLES" --keep 0.1 ;;
        graft)   # a region of 10 % of the delta, learnt on the downstream data
            merge_run graft --data "$OUT/data/train.json" --budget 0.1 --steps "$GRAFT_STEPS" ;;
        *)
            echo "compare_methods.sh: unknown method '$m' in METHODS" >&2; exit 2 ;;
    esac
    RUNS+=("$OUT/runs/$m")
done

# what each run learnt (D) and forgot (U), with H; cached per model and task
echo "== eval-forgetting" >&2
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" > /dev/null
cat "$OUT/report/report.md"
echo
"$PY" scripts/method_costs.py "${RUNS[@]}"
echo
echo "finished in $(( $(date +%s) - START )) s; report $OUT/report/report.md, runs $OUT/runs/"

#!/usr/bin/env bash
# Every method the toolkit runs, on the embedded default, under the same data, tuned layers, steps,
# optimiser and evaluation, over several seeds; prints the forgetting report, the mean and spread over
# seeds (with a chart of U against D with error bars), and each method's costs.
#   mask strategies  dowser magnitude wanda random inverse   (dowser mask, then finetune --mask)
#   training-time    full-ft attn-only spider lora osf supertuning   (finetune --method / --targets)
#   post-hoc         dare tailor graft                       (dowser merge of the same seed's Full-FT run)
#
#   scripts/compare_methods.sh [OUT]      (env: METHODS, SEEDS, DOWSER, DEMO_STEPS, DEMO_PROBE_SAMPLES,
#                                          DEMO_TASKS, CALIB_SAMPLES)
# A seed sets the data order of every run (finetune --seed), the probe behind the score-based masks
# (dowser, wanda, inverse: probe --seed), the random mask, and the post-hoc methods' own draws; run
# names are METHOD-sSEED. Finished stages are reused when their command and inputs are unchanged.
set -euo pipefail
OUT=${1:-${DEMO_OUT:-compare-out}}
source "$(dirname "$0")/common.sh"
METHODS=${METHODS:-"full-ft dowser magnitude wanda random attn-only osf supertuning spider lora dare tailor graft"}
SEEDS=${SEEDS:-"0 1 2"}
LAYERS=(--tune-layers last:20)   # the paper's 20 tuned layers (of smol-llava's 30)
CALIB_SAMPLES=${CALIB_SAMPLES:-128}              # Model Tailor's calibration examples (its paper: 128)
GRAFT_STEPS=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))  # Grafting's mask steps: half the fine-tuning's
START=$(date +%s)
data_and_scores

finetune_run() {  # finetune_run NAME "INPUT FILES" ARGS...
    local name=$1 inputs=$2
    shift 2
    run_stage "run-$name" "$OUT/runs/$name/run.yaml" "$OUT/data/train.json $inputs" \
        $DOWSER finetune "$MODEL" "${TRAIN[@]}" "${LAYERS[@]}" --seed "$SEED" "$@" --out "$OUT/runs/$name"
}

merge_run() {  # merge_run NAME ARGS...: a post-hoc method applied to this seed's Full-FT run
    local name=$1
    shift
    [[ -n ${FULL_FT_DONE[$SEED]:-} ]] || {
        finetune_run "full-ft-s$SEED" "" --method full-ft; FULL_FT_DONE[$SEED]=1; }
    run_stage "merge-$name-s$SEED" "$OUT/runs/$name-s$SEED/run.yaml" \
        "$OUT/runs/full-ft-s$SEED/delta.safetensors $OUT/data/train.json" \
        $DOWSER merge "$OUT/runs/full-ft-s$SEED" --method "$name" --seed "$SEED" "$@" --out "$OUT/runs/$name-s$SEED"
}

declare -A FULL_FT_DONE=()
RUNS=()
for SEED in $SEEDS; do
    case " $METHODS " in *" dowser "*|*" wanda "*|*" inverse "*|*" magnitude "*|*" random "*) scores_for "$SEED" ;; esac
    for m in $METHODS; do
        name="$m-s$SEED"
        case $m in
            dowser|magnitude|wanda|random|inverse)
                run_stage "mask-$name" "$OUT/mask-$name.safetensors" "$SCORES" \
                    $DOWSER mask "$SCORES" --ratio "$RATIO" --strategy "$m" --layers last:20 --seed "$SEED" \
                    --out "$OUT/mask-$name.safetensors"
                finetune_run "$name" "$OUT/mask-$name.safetensors" --mask "$OUT/mask-$name.safetensors" ;;
            full-ft)
                finetune_run "$name" "" --method full-ft
                FULL_FT_DONE[$SEED]=1 ;;
            attn-only)  # q/k/v/o of the tuned layers densely, MLP and norms frozen (arXiv 2510.08564's SA Proj.)
                finetune_run "$name" "" --method full-ft --targets attn --freeze-norms ;;
            spider)
                finetune_run "$name" "" --method spider ;;
            lora)  # rank 8 adapters; LoRA's usual 10x higher lr than dense fine-tuning
                finetune_run "$name" "" --method lora --lora-r 8 --lora-alpha 16 --lr 1e-3 ;;
            osf)   # PEFT's OSF, its default: the top half of each matrix's singular directions frozen
                finetune_run "$name" "" --method osf ;;
            supertuning)  # PEFT's Super-Tuning: the 10 % largest-magnitude entries (rho's 10 %)
                finetune_run "$name" "" --method supertuning --ratio "$RATIO" ;;
            dare)
                merge_run dare --p 0.9 ;;
            tailor)  # calibration samples of the downstream data, 10 % of the delta kept (rho's 10 %)
                merge_run tailor --data "$OUT/data/train.json" --calib-samples "$CALIB_SAMPLES" --keep 0.1 ;;
            graft)   # a region of 10 % of the delta, learnt on the downstream data
                merge_run graft --data "$OUT/data/train.json" --budget 0.1 --steps "$GRAFT_STEPS" ;;
            *)
                echo "compare_methods.sh: unknown method '$m' in METHODS" >&2; exit 2 ;;
        esac
        RUNS+=("$OUT/runs/$name")
    done
done

# what each run learnt (D) and forgot (U), with H and 95 % intervals; cached per model and task
echo "== eval-forgetting" >&2
$DOWSER eval-forgetting --base "$MODEL" "${RUNS[@]}" --tasks "$TASKS" --out "$OUT/report" --batch-size 16 > /dev/null
cat "$OUT/report/report.md"
echo
"$PY" scripts/aggregate_seeds.py "$OUT/report" --out "$OUT/report/seeds.png" | tee "$OUT/report/seeds.md"
echo
"$PY" scripts/method_costs.py "${RUNS[@]}"
echo
echo "finished in $(( $(date +%s) - START )) s; report $OUT/report/report.md (+ seeds.md, seeds.png), runs $OUT/runs/"

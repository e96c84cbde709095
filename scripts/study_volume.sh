#!/usr/bin/env bash
# Does the score do the work? Model-Dowser's mask against any 10 % (random), the score's ablations and
# Full-FT, as training grows towards the paper's volume (issue 28; results in docs/results.md).
#
#   scripts/study_volume.sh [OUT] [STAGE...]      (default OUT study-out/, every stage in order)
#
# Stages, in the order of priority they run in (each finished step is reused, so the script can be
# stopped at any time and run again to go on where it stopped; a long run resumes from its
# checkpoint, written every SAVE_EVERY steps):
#   stress   lr 1e-3 at 64 steps (the cheap stress): $STRESS_METHODS (default full-ft dowser random
#            inverse), seeds $SEEDS
#   volume   lr 1e-4, VOLUME_STEPS steps of 4 (default 1024), snapshots at 64 128 256 512, the live
#            drift meter every DRIFT_EVERY steps:
#            full-ft dowser random inverse, seeds $SEEDS
#   replay   replay (data-free rehearsal) and dowser + replay, seeds $SEEDS, at each setting of
#            EXTRAS_AT (default "stress volume": the cheap stress first)
#   ablate   $ABLATIONS (default magnitude wanda sensitivity), at each setting of EXTRAS_AT: seeds $SEEDS at the stress,
#            seed 0 along the volume
#   text     the second task: smollm2-135m on zorbish (text only; suite text-demo), the volume stage
#            (full-ft first) and its report, seed 0, under OUT/text
#   report   eval-forgetting of every finished stress run (OUT/report-stress) and of every volume run's
#            snapshots and end, finished or not (OUT/report-volume, with forgetting curves), each paired
#            against dowser of the same seed and step; aggregate_seeds.py's table beside (seeds.md)
# Everything else is the demo's (scripts/common.sh): smol-llava, the shapes task, rho 0.1, the last 20
# of 30 layers, batch 4, projector trained at 1e-3, cosine with 3 % warm-up, fp32 on the CPU.
# Each step's wall time is appended to OUT/timings.tsv.
set -euo pipefail
OUT=${1:-${STUDY_OUT:-study-out}}
shift || true
STAGES=${*:-"stress volume replay ablate report text"}
source "$(dirname "$0")/common.sh"
SEEDS=${SEEDS:-"0 1"}
STRESS_LR=${STRESS_LR:-1e-3}
STRESS_STEPS=${STRESS_STEPS:-$STEPS}     # the demo's 64 (DEMO_STEPS)
VOLUME_STEPS=${VOLUME_STEPS:-1024}
SNAPSHOTS=${SNAPSHOTS:-"64,128,256,512"}
SAVE_EVERY=${SAVE_EVERY:-16}
DRIFT_EVERY=${DRIFT_EVERY:-32}   # the live drift meter (finetune --drift-every)
# which methods the volume stage runs, and which settings the report evaluates (two invocations with
# disjoint VOLUME_METHODS can train side by side, e.g. one thread each: OMP_NUM_THREADS=1)
VOLUME_METHODS=${VOLUME_METHODS:-"dowser random full-ft inverse"}
STRESS_METHODS=${STRESS_METHODS:-"full-ft dowser random inverse"}
REPORT_SETTINGS=${REPORT_SETTINGS:-"stress volume"}
EXTRAS_AT=${EXTRAS_AT:-"stress volume"}   # where the replay and ablate stages train
ABLATIONS=${ABLATIONS:-"magnitude wanda sensitivity"}
TUNE=${STUDY_LAYERS:-last:20}        # the paper's 20 tuned layers (of smol-llava's 30)
LAYERS=(--tune-layers "$TUNE")
# smol-llava's fresh projector trains densely at its own lr, as in the demo; a text model has none
if [[ -n ${STUDY_TEXT:-} ]]; then PROJECTOR=(); else PROJECTOR=(--projector-lr 1e-3 --train-projector); fi
touch "$OUT/timings.tsv"

timed() {  # timed NAME CMD...: run, and append "NAME seconds" to timings.tsv
    local name=$1 t0
    shift
    t0=$(date +%s)
    "$@"
    printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$(date -u +%FT%TZ)" >> "$OUT/timings.tsv"
}

mask_for() {  # mask_for STRATEGY SEED -> $MASK
    local m=$1 seed=$2
    scores_for "$seed"
    MASK="$OUT/mask-$m-s$seed.safetensors"
    run_stage "mask-$m-s$seed" "$MASK" "$SCORES" \
        $DOWSER mask "$SCORES" --ratio "$RATIO" --strategy "$m" --layers "$TUNE" --seed "$seed" --out "$MASK"
}

# train NAME SEED "INPUT FILES" ARGS...: one fine-tuning run under $OUT/runs/NAME, resumed from its
# checkpoint when an earlier invocation was stopped mid-run
train() {
    local name=$1 seed=$2 inputs=$3 dir="$OUT/runs/$1" key
    shift 3
    local cmd=($DOWSER finetune "$MODEL" --data "$OUT/data/train.json" --config cpu-small --batch-size 4
               "${PROJECTOR[@]}" "${LAYERS[@]}" --seed "$seed" "$@")
    key=$( { echo "${cmd[*]}"; for f in $OUT/data/train.json $inputs; do sha256sum "$f" | cut -d' ' -f1; done; } |
           sha256sum | cut -d' ' -f1)
    if [[ -f "$dir/run.yaml" && ( "$(cat "$OUT/.stamps/run-$name" 2>/dev/null)" == "$key" ||
          "$(cat "$OUT/.stamps/run-$name.partial" 2>/dev/null)" == "$key" ) ]]; then   # (finished unwatched)
        echo "== run-$name: reusing $dir" >&2
        echo "$key" > "$OUT/.stamps/run-$name"
        return
    fi
    if [[ -f "$dir/checkpoint/state.yaml" && "$(cat "$OUT/.stamps/run-$name.partial" 2>/dev/null)" == "$key" ]]; then
        echo "== run-$name: resuming $dir" >&2
        timed "run-$name(resumed)" "${cmd[@]}" --out "$dir" --resume
    else
        echo "== run-$name" >&2
        rm -rf "$dir"
        echo "$key" > "$OUT/.stamps/run-$name.partial"
        timed "run-$name" "${cmd[@]}" --out "$dir"
    fi
    echo "$key" > "$OUT/.stamps/run-$name"
}

setting_args() {  # setting_args SETTING -> $ARGS: the stress's or the volume's training settings
    case $1 in
        stress) ARGS=(--lr "$STRESS_LR" --max-steps "$STRESS_STEPS") ;;
        volume) ARGS=(--lr 1e-4 --max-steps "$VOLUME_STEPS" --snapshot-steps "$SNAPSHOTS"
                      --drift-every "$DRIFT_EVERY" --save-every "$SAVE_EVERY") ;;
        *) echo "study_volume.sh: unknown setting $1 (stress or volume)" >&2; exit 2 ;;
    esac
}

method_run() {  # method_run STAGE METHOD SEED ARGS...: a named run of one method of the study
    local stage=$1 m=$2 seed=$3
    shift 3
    case $m in
        full-ft) train "$stage-$m-s$seed" "$seed" "" --method full-ft "$@" ;;
        dowser|random|inverse|magnitude|wanda|sensitivity)
            mask_for "$m" "$seed"
            train "$stage-$m-s$seed" "$seed" "$MASK" --mask "$MASK" "$@" ;;
        replay) train "$stage-$m-s$seed" "$seed" "" --method replay "$@" ;;
        dowser+replay)
            mask_for dowser "$seed"
            train "$stage-$m-s$seed" "$seed" "$MASK" --method replay --mask "$MASK" "$@" ;;
        *) echo "study_volume.sh: unknown method $m" >&2; exit 2 ;;
    esac
}

data_and_scores
for stage in $STAGES; do
    case $stage in
        stress)
            setting_args stress
            for seed in $SEEDS; do for m in $STRESS_METHODS; do
                method_run stress "$m" "$seed" "${ARGS[@]}"
            done; done ;;
        volume)
            setting_args volume
            for seed in $SEEDS; do for m in $VOLUME_METHODS; do
                method_run volume "$m" "$seed" "${ARGS[@]}"
            done; done ;;
        replay)
            for at in $EXTRAS_AT; do
                setting_args "$at"
                for seed in $SEEDS; do for m in dowser+replay replay; do
                    method_run "$at" "$m" "$seed" "${ARGS[@]}"
                done; done
            done ;;
        ablate)
            for at in $EXTRAS_AT; do
                setting_args "$at"
                seeds=$SEEDS; [[ $at == volume ]] && seeds=0
                for seed in $seeds; do for m in $ABLATIONS; do
                    method_run "$at" "$m" "$seed" "${ARGS[@]}"
                done; done
            done ;;
        report)   # every finished run, and every snapshot of the volume runs (finished or not)
            for setting in $REPORT_SETTINGS; do
                runs=()
                for d in "$OUT"/runs/$setting-*; do
                    [[ -f $d/run.yaml || -d $d/snapshots ]] && runs+=("$d")
                done
                [[ ${#runs[@]} -gt 0 ]] || continue
                extra=(); [[ $setting == volume ]] && extra=(--snapshots)
                echo "== eval-$setting (${#runs[@]} runs)" >&2
                timed "eval-$setting" $DOWSER eval-forgetting --base "$MODEL" "${runs[@]}" --tasks "$TASKS" \
                    --reference "$setting-dowser" --out "$OUT/report-$setting" --batch-size 16 "${extra[@]}" > /dev/null
                "$PY" "$(dirname "$0")/aggregate_seeds.py" "$OUT/report-$setting" > "$OUT/report-$setting/seeds.md"
                echo "$OUT/report-$setting/report.md (+ report-curves.png, seeds.md)" >&2
            done ;;
        text)     # the second task: SmolLM2-135M alone, text only (zorbish, suite text-demo), in OUT/text;
                  # Full-FT first, to see that it learns the task at these settings before any mask runs
            STUDY_TEXT=1 DEMO_MODEL=smollm2-135m DEMO_DATA=zorbish DEMO_TASKS=text-demo SEEDS=0 \
                VOLUME_METHODS="full-ft dowser random inverse" REPORT_SETTINGS=volume \
                bash "$0" "$OUT/text" volume report ;;
        *) echo "study_volume.sh: unknown stage $stage" >&2; exit 2 ;;
    esac
done

# Shared by demo.sh, compare_methods.sh and the sweeps (source it after setting OUT): the embedded
# default's settings, a stage runner that reuses finished stages, and the data + scores stages.
# the project's venv when there is one (scripts run from the repository root), else dowser on PATH
if [[ -z ${DOWSER:-} ]]; then
    if [[ -x .venv/bin/dowser ]]; then DOWSER=.venv/bin/dowser; else DOWSER=dowser; fi
fi
MODEL=${DEMO_MODEL:-smol-llava}
STEPS=${DEMO_STEPS:-64}
PROBE_SAMPLES=${DEMO_PROBE_SAMPLES:-16}
TASKS=${DEMO_TASKS:-demo}
DATA=${DEMO_DATA:-shapes}   # the built-in downstream data (`dowser make-data`)
RATIO=0.1
mkdir -p "$OUT/.stamps"

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

# the downstream task (rendered shapes asked their colour: a training split and a held-out test split)
# and the data-free importance scores of one probe seed (scores_for SEED), once per model and seed
data_and_scores() {
    run_stage data "$OUT/data/train.json" "" \
        $DOWSER make-data "$DATA" --out "$OUT/data"
    scores_for 0
}

declare -A SCORES_DONE=()
scores_for() {  # scores_for SEED: $OUT/scores.safetensors for seed 0 (the demo's), else scores-sSEED -> $SCORES
    local seed=$1 file="$OUT/scores.safetensors"
    [[ $seed == 0 ]] || file="$OUT/scores-s$seed.safetensors"
    if [[ -z ${SCORES_DONE[$seed]:-} ]]; then
        run_stage "probe-s$seed" "$file" "" \
            $DOWSER probe "$MODEL" --samples "$PROBE_SAMPLES" --batch-size 4 --probes 8 --seed "$seed" --out "$file"
        SCORES_DONE[$seed]=1
    fi
    SCORES=$file
}

# the same data, layers, steps and optimiser for every method. smol-llava's vision tower and projector
# are freshly initialised (seeded): the projector holds no pretrained knowledge to protect, so every
# method trains it densely at its own higher lr; the methods differ only in the decoder layers.
# (the tuned layers are given per script: masks made for other layers fix them)
TRAIN=(--data "$OUT/data/train.json" --config cpu-small --max-steps "$STEPS" --batch-size 4
       --lr 1e-4 --projector-lr 1e-3 --train-projector)

# the python beside $DOWSER (for the helper scripts), else python3
PY=${PYTHON:-$(dirname "$(command -v "${DOWSER%% *}" || echo python3)")/python}
[[ -x "$PY" ]] || PY=python3

#!/usr/bin/env bash
# Model-Dowser against the paper's baselines on the embedded default (smol-llava), end to end, on a
# CPU, no downloads:
#   make-data -> probe -> mask (dowser) -> finetune (dowser's mask, Full-FT, SPIDER, LoRA)
#   -> merge (DARE and Model Tailor of the Full-FT run)
#   -> eval-forgetting (digits downstream; SmolLM2's facts and drift upstream)
# A plain pipeline of the subcommands (scripts/compare_methods.sh, which this runs with the demo's
# methods; adapt it for a cluster by changing the model, data, recipe and sizes, see
# configs/recipes/paper.yaml for the paper's settings). compare_methods.sh alone runs every method,
# including Grafting and the magnitude / wanda / random masks, which do not fit the demo's 15 minutes.
#
#   scripts/demo.sh [OUT]            everything goes under OUT (default demo-out/)
#
# Scaled down from the paper only where a 2-core CPU and a 15-minute budget demand it:
#   probe  K = 16 samples (paper 64), B 4, M 8, text-only probes, all layers (as in the paper)
#   tune   the last 20 of 30 decoder layers (the paper's 20), rho 0.1 (the paper's); STEPS optimiser
#          steps of 4 examples (the paper: 5 epochs of a full dataset), lr 1e-4 (paper 2e-5 over far
#          more steps; LoRA 1e-3), cosine with 3 % warm-up, AdamW, fp32 on CPU.
# smol-llava's vision tower and projector are freshly initialised (seeded): the projector holds no
# pretrained knowledge to protect, so every method trains it densely, at its own higher lr; the
# methods only decide which decoder weights move.
# Re-running reuses every finished stage whose inputs (files and command) are unchanged.
set -euo pipefail
OUT=${1:-${DEMO_OUT:-demo-out}}
export METHODS=${DEMO_METHODS:-"full-ft dowser spider lora dare tailor"}
bash "$(dirname "$0")/compare_methods.sh" "$OUT"
echo "everything is under $OUT/: report $OUT/report/report.md (+ .yaml, chart report.png), runs $OUT/runs/,"
echo "masks $OUT/mask-*.safetensors, scores $OUT/scores.safetensors"

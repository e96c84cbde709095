#!/usr/bin/env bash
# Model-Dowser on the embedded default (smol-llava), end to end, on a CPU, no downloads:
#   make-data shapes -> probe -> mask -> finetune (Full-FT, dowser's mask, and the two strongest peers
#   of scripts/compare_methods.sh) -> eval-forgetting (shapes downstream; 360 upstream items and drift,
#   every score with its 95 % bootstrap interval)
# It is compare_methods.sh with fewer methods and one seed (DEMO_METHODS, SEEDS override them);
# compare_methods.sh alone runs every method over three seeds.
#
#   scripts/demo.sh [OUT]            everything goes under OUT (default demo-out/)
#
# Scaled down from the paper only where a 2-core CPU and a 15-minute budget demand it:
#   probe  K = 16 samples (paper 64), B 4, M 8, text-only probes, all layers (as in the paper)
#   tune   the last 20 of 30 decoder layers (the paper's 20), rho 0.1 (the paper's); DEMO_STEPS optimiser
#          steps of 4 examples (the paper: 5 epochs of a full dataset), lr 1e-4 (paper 2e-5 over far
#          more steps), cosine with 3 % warm-up, AdamW, fp32 on CPU.
# smol-llava's vision tower and projector are freshly initialised (seeded): the projector holds no
# pretrained knowledge to protect, so every method trains it densely, at its own higher lr; the
# methods only decide which decoder weights move.
# Re-running reuses every finished stage whose inputs (files and command) are unchanged.
set -euo pipefail
OUT=${1:-${DEMO_OUT:-demo-out}}
# the two peers with the highest H in compare_methods.sh's seed-0 run (2026-12-01): the random mask and
# PEFT's Super-Tuning, both at rho 0.1
export METHODS=${DEMO_METHODS:-"full-ft dowser random supertuning"}
export SEEDS=${SEEDS:-0}
bash "$(dirname "$0")/compare_methods.sh" "$OUT"
echo "everything is under $OUT/: report $OUT/report/report.md (+ .yaml, chart report.png), runs $OUT/runs/,"
echo "masks $OUT/mask-*.safetensors, scores $OUT/scores.safetensors"

#!/usr/bin/env bash
# The checks that need a GPU, in one run that prints one table (scripts/gpu_check.py says what each
# check does); --dry-run runs them all on the CPU at toy sizes, as CI does.
#   scripts/gpu_check.sh [--dry-run] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"

#!/usr/bin/env bash
# Train the shipped ensembles (2 members per channel) on pairs simulated from ../shared/data
# plus synthetic phantoms, then write model_weights/<channel>/ with a calibrated gate.
# usage: scripts/train_shipped.sh [MEMBERS] [extra python -m train options...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
members="${1:-2}"
shift || true
python="${PYTHON:-.venv/bin/python}"
for channel in nucleus membrane; do
    "$python" -m train --config "train/configs/shipped_${channel}.json" --members "$members" \
        --runs runs/shipped --weights model_weights "$@"
done

#!/usr/bin/env bash
# Train the shipped ensembles (2 members per channel) on pairs simulated from ../shared/data
# plus synthetic phantoms, then write model_weights/<channel>/ with a calibrated gate.
# In phases, as the shipped weights were made: 500 steps with the MAE loss; each member resumed
# to 1000 steps (nucleus with an added SSIM term, which its MAE-only phase lacked); both channels
# resumed to 2000 steps with the SSIM term; membrane, still improving, resumed to 3000. Each phase
# rewrites the ensemble and recalibrates its gate; the best checkpoint over all phases is exported.
# usage: scripts/train_shipped.sh [MEMBERS] [extra python -m train options...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
members="${1:-2}"
shift || true
python="${PYTHON:-.venv/bin/python}"
declare -A phase2=([nucleus]="--ssim-weight 1.0" [membrane]="")
declare -A final_steps=([nucleus]=2000 [membrane]=3000)
for channel in nucleus membrane; do
    common=(--config "train/configs/shipped_${channel}.json" --members "$members" --runs runs/shipped
            --weights model_weights --overwrite)
    "$python" -m train "${common[@]}" "$@"
    # shellcheck disable=SC2086  # phase2 holds zero or more options
    "$python" -m train "${common[@]}" --resume --steps 1000 ${phase2[$channel]} "$@"
    "$python" -m train "${common[@]}" --resume --steps 2000 --ssim-weight 1.0 "$@"
    if (( final_steps[$channel] > 2000 )); then
        "$python" -m train "${common[@]}" --resume --steps "${final_steps[$channel]}" --ssim-weight 1.0 "$@"
    fi
done

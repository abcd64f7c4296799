#!/usr/bin/env bash
# Train both ensembles for unseen content (issue 9): domain-randomised simulation of the 'train'
# volumes of train/splits/heldout.json, checkpoints chosen on its 'validation' volumes, in phases
# of PHASE steps that alternate between the channels, so that both progress evenly and the run
# can stop at any point and resume (also on another machine: the run folder is committed).
# One thread by default (OMP_NUM_THREADS), so it can run in the background while you work.
# RECIPE names the configs (train/configs/RECIPE_{membrane,nucleus}.json) and the default run
# folder (train/checkpoints/RECIPE). The default, corrected_gated, is the recipe of the shipped
# membrane members: members that read the attenuation-corrected view, both channels learning from
# the membrane volumes, checkpoints chosen through the safety net (the shipped nucleus members are
# that recipe's start: no trained checkpoint beat it on the nucleus validation). Its committed run
# folder resumes where session 14 stopped. How the shipped ensembles were assembled from its
# checkpoints: train/shipped.json, scripts/reproduce_shipped.py.
# Recipes of one channel only (fused_gauss, fused, generalise, ...) need CHANNELS=membrane.
# CHANNELS (default "membrane nucleus") picks the channels: two runs, one per channel, use two cores.
# usage: [RECIPE=fused] [CHANNELS=membrane] scripts/train_generalise.sh [FINAL_STEPS] [PHASE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
final="${1:-3000}"
phase="${2:-200}"
python="${PYTHON:-.venv/bin/python}"
recipe="${RECIPE:-corrected_gated}"
runs="${RUNS:-train/checkpoints/$recipe}"
channels="${CHANNELS:-membrane nucleus}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for (( steps = phase; steps <= final; steps += phase )); do
    for channel in $channels; do
        "$python" -m train --config "train/configs/${recipe}_${channel}.json" --members 2 \
            --runs "$runs" --weights "$runs/weights" --resume --steps "$steps" --no-calibrate --overwrite --quiet
    done
done
# Calibrate each final ensemble's safety net on the validation volumes (checkpoints were chosen
# there too). Ship only by the ship rule (python bench/ship_decision.py CONFIG --shipped
# model_weights/<channel> --contender "$runs/weights/<channel>"), then copy the winner into
# model_weights/ and record how it was made in train/shipped.json (python
# scripts/reproduce_shipped.py must then rebuild it).
for channel in $channels; do
    "$python" -m train --config "train/configs/${recipe}_${channel}.json" --weights "$runs/weights" \
        --calibrate-only --quiet
done

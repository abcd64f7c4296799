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
# Time: about 8 minutes per 200-step phase per member and channel at one thread on the 2-core
# CPU development machine (the committed logs' `seconds` column), so each 1000 steps of both
# channels' two members take about 2.7 hours.
# usage: [RECIPE=fused] [CHANNELS=membrane] scripts/train_generalise.sh [FINAL_STEPS] [PHASE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() { sed -n '2,/^# usage/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
final="${1:-3000}"
phase="${2:-200}"
if ! [[ "$final" =~ ^[0-9]+$ && "$phase" =~ ^[1-9][0-9]*$ ]]; then
    echo "train_generalise.sh: FINAL_STEPS and PHASE must be whole numbers (PHASE > 0), got '$final' '$phase'" >&2
    exit 2
fi
python="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "train_generalise.sh: no Python at $python (make the venv as the README says, or set PYTHON)" >&2
    exit 2
fi
recipe="${RECIPE:-corrected_gated}"
runs="${RUNS:-train/checkpoints/$recipe}"
channels="${CHANNELS:-membrane nucleus}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Resume where the members are: the lowest last logged step of any member of these channels.
reached=""
for channel in $channels; do
    for log in "$runs/$channel"/member_*/log.csv; do
        [[ -f "$log" ]] || continue
        step=$(tail -n 1 "$log" | cut -d, -f1)
        [[ "$step" =~ ^[0-9]+$ ]] && { [[ -z "$reached" ]] || (( step < reached )); } && reached=$step
    done
done
reached="${reached:-0}"
first=$(( (reached / phase + 1) * phase ))
if (( first > final )); then
    echo "train_generalise.sh: $runs is at step $reached, FINAL_STEPS is $final: nothing to train" >&2
else
    echo "train_generalise.sh: $recipe ($channels) from step $reached to $final in phases of $phase, into $runs" >&2
fi
for (( steps = first; steps <= final; steps += phase )); do
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
    if [[ ! -f "$runs/weights/$channel/manifest.json" ]]; then
        echo "train_generalise.sh: no $channel ensemble in $runs/weights to calibrate (nothing trained yet)" >&2
        continue
    fi
    "$python" -m train --config "train/configs/${recipe}_${channel}.json" --weights "$runs/weights" \
        --calibrate-only --quiet
done

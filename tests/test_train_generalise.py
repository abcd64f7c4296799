"""scripts/train_generalise.sh: its default recipe, its help and the checks it makes before training
(no training runs here: a phase takes minutes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "train_generalise.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_help_prints_the_header_and_bad_numbers_are_exit_2():
    shown = _run("--help")
    assert shown.returncode == 0 and "usage:" in shown.stdout and "minutes per 200-step phase" in shown.stdout
    for bad in (("abc",), ("400", "0"), ("-5",)):
        refused = _run(*bad)
        assert refused.returncode == 2 and "must be whole numbers" in refused.stderr


def test_a_run_already_past_final_steps_trains_nothing_and_changes_nothing(tmp_path):
    runs = tmp_path / "runs"
    for k in (0, 1):
        log = runs / "membrane" / f"member_{k}" / "log.csv"
        log.parent.mkdir(parents=True)
        log.write_text("step,loss\n0,nan\n600,0.1\n")
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    done = _run("400", "200", RUNS=str(runs), CHANNELS="membrane")
    assert done.returncode == 0, done.stderr
    assert "is at step 600, FINAL_STEPS is 400: nothing to train" in done.stderr
    assert "no membrane ensemble in" in done.stderr
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


def test_train_generalise_defaults_to_the_shipped_membrane_recipe_whose_configs_load():
    """``scripts/train_generalise.sh`` with no RECIPE runs the recipe the shipped membrane members
    came from (``train/shipped.json``), and its configs of both channels load."""
    from fusecare.training.config import TrainConfig

    [recipe] = re.findall(r'recipe="\$\{RECIPE:-(\w+)\}"', SCRIPT.read_text())
    for channel in ("membrane", "nucleus"):
        assert TrainConfig.load(REPO / "train" / "configs" / f"{recipe}_{channel}.json").channel == channel
    shipped = json.loads((REPO / "train" / "shipped.json").read_text())
    assert shipped["membrane"]["config"] == f"train/configs/{recipe}_membrane.json"

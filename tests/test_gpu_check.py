"""scripts/gpu_check.py: no GPU here, so its --help and its CPU dry run are what can be checked."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, make_tiny_ensemble


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_is_clean():
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--dry-run" in result.stdout and not result.stderr


@pytest.mark.slow
def test_dry_run_on_cpu_reports_every_step(tmp_path, capsys):
    weights = make_tiny_ensemble(tmp_path, "membrane", gate_scale=0.1)
    assert _script().main(["--dry-run", "--device", "cpu", "--weights", str(weights)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"versions", "tile", "forced_oom", "end_to_end"}
    assert report["tile"]["fp16_vs_fp32"]["finite"]
    oom = report["forced_oom"]
    assert oom["retry_tile"] != oom["raised_on"]
    assert sum(report["end_to_end"]["modes"].values()) > 0

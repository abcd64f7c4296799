"""scripts/reproduce_shipped.py: the shipped members rebuild from committed checkpoints, and a
difference in any member file or gate is reported (exit 1). Calibration itself is
``tests/training``'s; here it is skipped (``--no-calibrate``), so no validation data is needed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch
from conftest import REPO

from fusecare.restoration.ensemble import read_manifest, write_manifest
from fusecare.restoration.gate import GateConfig


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_shipped", REPO / "scripts" / "reproduce_shipped.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_shipped_members_rebuild_from_the_committed_checkpoints(tmp_path, capsys):
    script = _script()
    assert script.main(["--no-calibrate", "--out", str(tmp_path / "w")]) == 0
    table = capsys.readouterr().out
    for channel in script.load_recipes():
        assert f"| {channel} | not calibrated | equal | not calibrated |" in table
    assert script.main(["--no-calibrate", "--out", str(tmp_path / "w")]) == 2  # exists: needs --overwrite
    assert script.main(["--no-calibrate", "--out", str(tmp_path / "w"), "--overwrite"]) == 0
    copied = read_manifest(tmp_path / "w" / "nucleus")  # members only: not the other channel's gate
    assert copied["channel"] == "nucleus" and copied["gate"] is None


def test_a_missing_ensemble_to_compare_with_stops_before_any_rebuild(tmp_path, caplog):
    out = tmp_path / "w"
    assert _script().main(["--out", str(out), "--compare", str(tmp_path / "none")]) == 2
    assert "no ensemble to compare with" in caplog.text and not out.exists()


def test_a_changed_tensor_or_gate_is_reported(tmp_path, capsys):
    script = _script()
    ours = tmp_path / "ours" / "membrane"
    shutil.copytree(REPO / "model_weights" / "membrane", ours)
    shipped = REPO / "model_weights" / "membrane"
    assert script.members_equal(ours, shipped)
    same = script.compare("membrane", ours, shipped, calibrated=True)
    assert same.ok and same.gate_equal and same.estimate == same.shipped_estimate
    manifest = read_manifest(ours)
    changed = GateConfig.from_dict({**manifest["gate"], "blend": 1.0})
    write_manifest(ours, "membrane", gate=changed, info=manifest["info"])
    assert not script.compare("membrane", ours, shipped, calibrated=True).ok
    weights = torch.load(ours / "member_1" / "weights.pt", weights_only=True)
    key = next(iter(weights))
    weights[key] = weights[key] + 1e-6
    torch.save(weights, ours / "member_1" / "weights.pt")
    write_manifest(ours, "membrane", gate=changed, info=manifest["info"])  # re-hashed, as a retrained member is
    assert not script.members_equal(ours, shipped)
    print(script.table([script.compare("membrane", ours, shipped, calibrated=False)]))
    assert "| membrane | not calibrated | DIFFERENT | not calibrated |" in capsys.readouterr().out
    shutil.copy(shipped / "member_1" / "weights.pt", ours / "member_1" / "weights.pt")
    write_manifest(ours, "nucleus", gate=GateConfig.from_dict(manifest["gate"]), info=manifest["info"])
    other = script.compare("membrane", ours, shipped, calibrated=True)  # the right gate, for another channel
    assert other.members_equal and other.gate_equal and not other.ok
    print(script.table([other]))
    assert "| membrane | nucleus, membrane (DIFFERENT) | equal | equal |" in capsys.readouterr().out


@pytest.mark.parametrize(("recipe", "message"), [
    ({"nucleus": {"config": "train/configs/corrected_nucleus.json"}}, "exactly one of"),
    ({"nucleus": {"config": "train/configs/corrected_nucleus.json", "members_of": "no/such/folder"}},
     "missing no/such/folder"),
    ({"nucleus": {"members_of": "train/checkpoints/corrected/weights/membrane"}}, "nucleus: no 'config'"),
    (None, "not a recipe file"),
])
def test_a_bad_recipe_is_one_line_exit_2(tmp_path, caplog, recipe, message):
    recipes = tmp_path / "shipped.json"
    if recipe is not None:
        recipes.write_text(json.dumps(recipe))
    assert _script().main(["--recipes", str(recipes), "--no-calibrate", "--out", str(tmp_path / "w")]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message in error and "\n" not in error

"""Training: config validation, losses, a tiny member end to end, resume, ensembles, CLI, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_fmc_tif
from scipy import ndimage

from fusecare.errors import ConfigError, InputError, TrainingError
from fusecare.io import inspect_case
from fusecare.normalize import PercentileNorm
from fusecare.restoration.ensemble import load_ensemble
from fusecare.restoration.model import ModelConfig
from fusecare.scoring.metrics import ssim
from fusecare.training.config import TrainConfig
from fusecare.training.loop import _rank_rng, _score, train_member
from fusecare.training.losses import ssim_torch, training_loss
from fusecare.training.members import train_ensemble
from fusecare.training.pairs import PairPatches, PatchSettings, load_split
from fusecare.training.sources import RealPairs, SimulatedPairs, build_data, volume_of

TINY = {"model": {"first_filters": 4, "depth": 1}, "patch": [8, 16, 16], "batch_size": 2,
        "phantoms": 1, "phantom_shape": [12, 32, 32], "validation_phantoms": 1, "validation_patches": 2,
        "device": "cpu"}


HALF_BLEND = {"spread_scale": 10.0, "fallback_sigma": 0.0, "prediction_sigma": 0.0, "consistency_scale": 0.0,
              "blend": 0.5}
"""A validation gate: half the prediction, half the normalised view, nothing else."""


def tiny(**changes) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def test_config_needs_data_and_consistent_loss():
    with pytest.raises(ConfigError, match="no training data"):
        TrainConfig()
    with pytest.raises(ConfigError, match="needs model.probabilistic"):
        tiny(loss="laplace")
    with pytest.raises(ConfigError, match="must be multiples of 2"):
        tiny(patch=[8, 16, 15])
    with pytest.raises(ConfigError, match=r"unknown TrainConfig key\(s\) \['stpes'\]"):
        TrainConfig.from_dict({**TINY, "stpes": 3})
    assert tiny(loss="laplace", model={"probabilistic": True, "first_filters": 4}).loss == "laplace"


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    out, y = torch.randn(2, 2, 8, 12, 12), torch.randn(2, 1, 8, 12, 12)
    out[:, 1] = out[:, 1].abs() + 0.1
    d = out[:, :1] - y
    torch.testing.assert_close(training_loss(out, y, loss="mae"), d.abs().mean())
    torch.testing.assert_close(training_loss(out, y, loss="mse"), (d**2).mean())
    b = out[:, 1:2]
    torch.testing.assert_close(training_loss(out, y, loss="laplace"), (torch.log(2 * b) + d.abs() / b).mean())
    with_ssim = training_loss(out, y, loss="mae", ssim_weight=0.5)
    torch.testing.assert_close(with_ssim, d.abs().mean() + 0.5 * (1 - ssim_torch(out[:, :1], y)))


def test_differentiable_ssim_equals_the_metric(rng):
    a = rng.random((12, 20, 18)).astype(np.float32)
    b = (a + 0.3 * rng.random(a.shape)).astype(np.float32)
    expected = ssim(a, b, data_range=1.0)
    got = float(ssim_torch(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]))
    assert abs(got - expected) < 1e-5


def _halving_source(rng) -> RealPairs:
    """Target = a smoothed copy of the input: a correction a tiny net starts to learn in 60 steps."""
    from scipy import ndimage

    source = rng.integers(0, 1000, (16, 32, 32)).astype(np.float32)
    target = ndimage.uniform_filter(source, 3)
    return RealPairs("toy", PairPatches(source, target, PatchSettings(patch=(8, 16, 16))))


@pytest.mark.slow
def test_a_tiny_member_learns_and_keeps_checkpoints(tmp_path, rng):
    config = tiny(steps=60, validate_every=20, learning_rate=3e-3)
    data = ([_halving_source(rng)], [])
    result = train_member(config, tmp_path / "run", progress=False, data=data)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 20, 40, 60]  # step 0: the untrained baseline
    assert float(rows[-1]["val_loss"]) < 0.9 * float(rows[0]["val_loss"])
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"config.json", "best.pt", "last.pt", "log.csv"}
    assert TrainConfig.load(tmp_path / "run" / "config.json") == config
    assert result.best["step"] in (20, 40, 60)


def test_checkpoints_are_chosen_on_the_content_weighted_score_when_phantoms_have_a_share(tmp_path, rng, caplog):
    assert _score({"val_loss": 1.0, "val_nssim_mean": 0.1, "val_nssim_weighted": 0.3}) == 0.3
    assert _score({"val_loss": 1.0, "val_nssim_mean": 0.1}) == 0.1
    assert _score({"val_loss": 1.0}) == -1.0
    real = write_fmc_tif(tmp_path / "v.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    content = write_fmc_tif(tmp_path / "t.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16),
                            channel="nucleus")
    config = tiny(steps=2, validate_every=2, validation_files=[str(real)], validation_views=2,
                  clean_files=[str(content)], validate_on_training_volumes=False)
    # without real training content there is nothing to weigh phantoms against: the plain mean
    only_phantoms = tiny(steps=2, validate_every=2, validation_files=[str(real)], phantom_share=0.5)
    train_member(only_phantoms, tmp_path / "phantoms", progress=False)
    assert "val_nssim_weighted" not in next(csv.DictReader((tmp_path / "phantoms" / "log.csv").open()))
    train_member(config, tmp_path / "plain", progress=False)
    train_member(config.replace(phantom_share=0.5), tmp_path / "run", progress=False)
    for name in ("plain", "run"):
        rows = list(csv.DictReader((tmp_path / name / "log.csv").open()))
        assert ("val_nssim_weighted" in rows[-1]) == (name == "run")
    # two real views (file v.tif) and one phantom, weighed half and half: not the mean of the three
    last = rows[-1]
    assert float(last["val_nssim_weighted"]) != pytest.approx(float(last["val_nssim_mean"]), abs=1e-6)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["score_metric"] == "val_nssim_weighted" and state["best_score"] == pytest.approx(
        float(last["val_nssim_weighted"]))
    # a run started without a share, resumed with one: scores of another kind are not compared
    with caplog.at_level("WARNING", logger="fusecare"):
        train_member(config.replace(phantom_share=0.5, steps=4), tmp_path / "plain", resume=True, progress=False)
    assert "chosen on val_nssim_mean, this run chooses on val_nssim_weighted" in caplog.text
    assert torch.load(tmp_path / "plain" / "best.pt", weights_only=False)["step"] == 4
    rows = list(csv.DictReader((tmp_path / "plain" / "log.csv").open()))  # the log gained the column
    assert [r["val_nssim_weighted"] == "" for r in rows] == [True, True, False]
    # through a gate that keeps the whole prediction, the gated score is the weighted one
    keep_all = HALF_BLEND | {"blend": 1.0}
    train_member(config.replace(phantom_share=0.5, validation_gate=keep_all), tmp_path / "gated", progress=False)
    last = list(csv.DictReader((tmp_path / "gated" / "log.csv").open()))[-1]
    assert float(last["val_nssim_gated"]) == pytest.approx(float(last["val_nssim_weighted"]), abs=1e-5)
    assert float(last["val_nssim_gated"]) != pytest.approx(float(last["val_nssim_mean"]), abs=1e-6)


def test_resume_continues_from_the_last_checkpoint(tmp_path, rng):
    data = ([_halving_source(rng)], [])
    train_member(tiny(steps=4, validate_every=2), tmp_path / "run", progress=False, data=data)
    train_member(tiny(steps=8, validate_every=2), tmp_path / "run", resume=True, progress=False, data=data)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "run" / "log.csv").open())]
    assert steps == [0, 2, 4, 6, 8]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 8


def test_ensemble_on_simulated_phantoms_loads_for_inference(tmp_path):
    results = train_ensemble(tiny(steps=2, validate_every=2), runs_dir=tmp_path / "runs",
                             weights_dir=tmp_path / "weights", members=2, progress=False)
    assert len(results) == 2 and "val_nssim_mean" in results[0].best
    ensemble = load_ensemble(tmp_path / "weights" / "nucleus")
    assert len(ensemble.members) == 2 and ensemble.members[0].config == ModelConfig(first_filters=4, depth=1)
    training = json.loads((tmp_path / "weights" / "nucleus" / "member_1" / "training.json").read_text())
    assert training["config"]["seed"] == 1
    # the do-no-harm gate was calibrated on the validation phantom and written to the manifest
    manifest = json.loads((tmp_path / "weights" / "nucleus" / "manifest.json").read_text())
    table = manifest["info"]["gate_calibration"]
    assert table[0]["gate"] is None and len(table) > 5  # the ungated row first
    assert ensemble.gate is not None and ensemble.gate.to_dict() == manifest["gate"]


def _run_train(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_cli_refuses_bad_config_and_bad_fmc_folder_before_training(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, "batch_sise": 2}))
    result = _run_train("--config", config)
    assert result.returncode == 2 and "unknown TrainConfig key(s) ['batch_sise']" in result.stderr
    assert "Traceback" not in result.stderr
    fmc = tmp_path / "fmc"
    write_fmc_tif(fmc / "image_4_nucleus_angle.tif", np.ones((4, 8, 8), np.uint16))
    config.write_text(json.dumps({**TINY, "phantoms": 0, "fmc_dir": str(fmc)}))
    result = _run_train("--config", config, "--runs", tmp_path / "runs", "--weights", tmp_path / "w")
    assert result.returncode == 2 and "FAILED image_4_nucleus_angle.tif: has no fused partner" in result.stderr
    assert "no FMC pair" in result.stderr
    assert not (tmp_path / "runs").exists()


def _torchrun(tmp_path: Path, config: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone lets the rendezvous take a free port: a fixed one failed when another run held it
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [sys.executable, *(launcher if nproc > 1 else []), "-m", "train", "--config", config,
         "--runs", tmp_path / "runs", "--weights", tmp_path / "w", "--quiet", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_trains_and_resumes_with_another_world_size(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, "steps": 2, "validate_every": 2}))
    result = _torchrun(tmp_path, config, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "w" / "nucleus" / "manifest.json").is_file()
    assert len(load_ensemble(tmp_path / "w" / "nucleus").members) == 1
    last = torch.load(tmp_path / "runs" / "nucleus" / "member_0" / "last.pt", weights_only=False)
    assert last["step"] == 2 and len(last["rng"]) == 2 and last["rng"][0] != last["rng"][1]  # every rank's stream
    # resumed by one process: rank 0's stream and the step go on, the log continues
    config.write_text(json.dumps({**TINY, "steps": 4, "validate_every": 2}))
    result = _torchrun(tmp_path, config, 1, "--resume", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "nucleus" / "member_0" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4] and np.isfinite(float(rows[1]["loss"]))
    last = torch.load(tmp_path / "runs" / "nucleus" / "member_0" / "last.pt", weights_only=False)
    assert last["step"] == 4 and len(last["rng"]) == 1


def test_resumed_ranks_draw_their_own_streams():
    config = tiny()
    saved = [np.random.default_rng(7).bit_generator.state]
    first = _rank_rng(config, 0, saved, 10)
    assert first.bit_generator.state == saved[0]  # rank 0 continues where it stopped
    new = [_rank_rng(config, r, saved, 10).random() for r in (1, 2)]  # ranks the checkpoint lacked
    fresh = [_rank_rng(config, r, None, 0).random() for r in (0, 1, 2)]
    assert len({first.random(), *new, *fresh}) == 6  # no stream repeats another


def test_clean_files_pick_their_channel_and_skip_others(tmp_path, rng):
    nuc = write_fmc_tif(tmp_path / "n.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    mem = write_fmc_tif(tmp_path / "m.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="membrane")
    sources, validation = build_data(tiny(phantoms=0, validation_phantoms=0, clean_files=[str(nuc), str(mem)]))
    assert [s.name for s in sources] == ["n.tif"]
    assert len(validation) == 1 and validation[0].name.startswith("n.tif (simulated")
    with pytest.raises(InputError, match="no clean volume of channel 'nucleus'.*content_channels"):
        build_data(tiny(phantoms=0, clean_files=[str(mem)]))


def test_content_channels_let_one_channel_learn_from_another(tmp_path, rng):
    """A nucleus run may simulate from membrane volumes when it says so, and only from those named."""
    nuc = write_fmc_tif(tmp_path / "n.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    mem = write_fmc_tif(tmp_path / "m.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="membrane")
    files = [str(nuc), str(mem)]
    only_membrane = tiny(phantoms=0, validation_phantoms=0, clean_files=files, content_channels=["membrane"])
    assert only_membrane.channel == "nucleus"
    assert [s.name for s in build_data(only_membrane)[0]] == ["m.tif"]
    both = tiny(phantoms=0, validation_phantoms=0, clean_files=files, content_channels=["nucleus", "membrane"])
    assert [s.name for s in build_data(both)[0]] == ["n.tif", "m.tif"]
    with pytest.raises(ConfigError, match="content_channels"):
        tiny(content_channels=["cytoplasm"])


def test_validation_only_builds_the_same_validation_and_no_training_source(tmp_path, rng, monkeypatch):
    """Gate recalibration needs the validation cases only: no training source (each costs a
    pass over its volume) is built, and a config with no validation case is refused by name."""
    nuc = write_fmc_tif(tmp_path / "n.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    from fusecare.training import sources as training

    config = tiny(phantoms=1, validation_phantoms=1, clean_files=[str(nuc)])
    _, full = training.build_data(config)
    built: list[str] = []
    monkeypatch.setattr(training, "SimulatedPairs", lambda name, *a, **k: built.append(name))
    sources, validation = training.build_data(config, validation_only=True)
    assert sources == [] and built == []
    assert [v.name for v in validation] == [v.name for v in full]
    for mine, theirs in zip(validation, full):
        np.testing.assert_array_equal(mine.source, theirs.source)
        np.testing.assert_array_equal(mine.target, theirs.target)
    with pytest.raises(InputError, match="no validation case in the config"):
        training.build_data(tiny(phantoms=1, validation_phantoms=0), validation_only=True)


def test_calibrate_only_rewrites_the_gate_without_training(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, "steps": 2, "validate_every": 2}))
    from train.train import main

    assert main(["--config", str(config), "--runs", str(tmp_path / "runs"), "--weights", str(tmp_path / "w"),
                 "--quiet"]) == 0
    manifest_path = tmp_path / "w" / "nucleus" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["gate"] = None
    manifest["info"].pop("gate_calibration")
    manifest_path.write_text(json.dumps(manifest))
    weights_before = (tmp_path / "w" / "nucleus" / "member_0" / "weights.pt").read_bytes()
    assert main(["--config", str(config), "--weights", str(tmp_path / "w"), "--calibrate-only"]) == 0
    manifest = json.loads(manifest_path.read_text())
    assert manifest["gate"] is not None and manifest["info"]["members"] == 1
    assert manifest["info"]["gate_cases"] == ["validation phantom 0"]
    assert manifest["info"]["gate_rule"] == "safe"  # one validation volume: nothing to cross-validate
    assert manifest["info"]["gate_rule_cross_validation"] == {"safe": None, "mean": None}
    assert len(manifest["info"]["gate_calibration"]) == 69  # ungated + 68 candidates
    assert (tmp_path / "w" / "nucleus" / "member_0" / "weights.pt").read_bytes() == weights_before


def test_calibrate_only_gives_copied_members_the_channel_of_their_new_gate(tmp_path):
    """Members copied from another channel's ensemble (the shipped nucleus ensemble is a copy of
    membrane members) take the channel their gate is calibrated for."""
    from conftest import make_tiny_ensemble

    from fusecare.restoration.ensemble import write_manifest
    from train.train import main

    config = tmp_path / "c.json"
    config.write_text(json.dumps(TINY))
    folder = make_tiny_ensemble(tmp_path / "w", "nucleus", members=1)
    write_manifest(folder, "membrane")
    assert main(["--config", str(config), "--weights", str(tmp_path / "w"), "--calibrate-only", "--quiet"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["channel"] == "nucleus" and manifest["gate"] is not None


def test_command_line_options_override_the_config_file(tmp_path):
    from train.train import build_parser, merged_config

    config = tmp_path / "c.json"
    config.write_text(json.dumps({**TINY, "steps": 3, "ssim_weight": 0.0, "seed": 4}))
    merged = merged_config(build_parser().parse_args(["--config", str(config), "--steps", "7",
                                                      "--ssim-weight", "0.5"]))
    assert (merged.steps, merged.ssim_weight, merged.seed, merged.patch) == (7, 0.5, 4, (8, 16, 16))
    with pytest.raises(ConfigError, match="ssim_weight"):
        merged_config(build_parser().parse_args(["--config", str(config), "--ssim-weight", "11"]))


# --------------------------------------------------------------------------- generalisation recipe


def test_members_start_from_the_matching_member_of_an_ensemble(tmp_path):
    """``init_weights`` naming an ensemble starts member k from its member_k: the first logged
    validation equals that member's own, and a resume never reloads it."""
    train_ensemble(tiny(steps=2, validate_every=2), runs_dir=tmp_path / "a", weights_dir=tmp_path / "w",
                   members=2, progress=False, calibrate=False)
    start = tiny(steps=2, validate_every=2, init_weights=str(tmp_path / "w" / "nucleus"), learning_rate=1e-6)
    train_ensemble(start, runs_dir=tmp_path / "b", weights_dir=tmp_path / "w2", members=2, progress=False,
                   calibrate=False)
    for k in range(2):
        saved = torch.load(tmp_path / "w" / "nucleus" / f"member_{k}" / "weights.pt", weights_only=True)
        first = torch.load(tmp_path / "b" / f"member_{k}" / "best.pt", weights_only=False)
        training = json.loads((tmp_path / "w2" / "nucleus" / f"member_{k}" / "training.json").read_text())
        assert training["config"]["init_weights"].endswith(f"member_{k}")
        drift = max(float((first["model"][n] - saved[n]).abs().max()) for n in saved)
        assert drift < 1e-3  # lr 1e-6 for 2 steps: still the member it started from
    other = TINY["model"] | {"first_filters": 8}
    with pytest.raises(ConfigError, match="differs from the config's"):
        train_member(tiny(model=other, init_weights=str(tmp_path / "w" / "nucleus" / "member_0")),
                     tmp_path / "c", progress=False)


def test_a_resume_on_other_validation_cases_does_not_compare_their_scores(tmp_path, rng, caplog):
    """A split that gains a validation volume changes what the scores mean: the best checkpoint
    chosen before is not compared with the new scores (the next validated one becomes the best);
    a plain resume keeps comparing."""
    extra = write_fmc_tif(tmp_path / "v.tif", rng.integers(0, 200, (16, 32, 32)).astype(np.uint16), channel="nucleus")
    config = tiny(steps=2, validate_every=2)
    train_member(config, tmp_path / "run", progress=False)

    def unbeatable_best() -> None:  # the saved best can then only be replaced by not comparing with it
        state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
        torch.save({**state, "best_score": 10.0}, tmp_path / "run" / "last.pt")

    unbeatable_best()
    with caplog.at_level("WARNING", logger="fusecare"):
        train_member(config.replace(steps=4), tmp_path / "run", resume=True, progress=False)
    assert "validates on others" not in caplog.text
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == 2
    unbeatable_best()
    with caplog.at_level("WARNING", logger="fusecare"):
        train_member(config.replace(steps=6, validation_files=[str(extra)]), tmp_path / "run", resume=True,
                     progress=False)
    assert "chosen on other validation cases, this run validates on" in caplog.text
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == 6
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert any(name.startswith("v.tif") for name in state["validation_cases"])
    # a checkpoint that did not record its cases (written before they were recorded) is not compared either
    torch.save({key: value for key, value in state.items() if key != "validation_cases"} | {"best_score": 10.0},
               tmp_path / "run" / "last.pt")
    with caplog.at_level("WARNING", logger="fusecare"):
        train_member(config.replace(steps=8, validation_files=[str(extra)]), tmp_path / "run", resume=True,
                     progress=False)
    assert "chosen on unrecorded validation cases" in caplog.text
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == 8


def test_a_zeroed_head_starts_at_the_smoothed_base_with_the_initial_features(tmp_path):
    """``init_zero_head``: the initial member's features, a zero correction, on a base of another
    ``base_sigma``; without it a different base is refused (the weights learned a correction of the
    input, not of a smoothed one)."""
    train_ensemble(tiny(steps=2, validate_every=2), runs_dir=tmp_path / "a", weights_dir=tmp_path / "w",
                   members=1, progress=False, calibrate=False)
    initial = str(tmp_path / "w" / "nucleus" / "member_0")
    smoothed = TINY["model"] | {"base_sigma": 0.6}
    with pytest.raises(ConfigError, match="differs from the config's"):
        train_member(tiny(model=smoothed, init_weights=initial), tmp_path / "refused", progress=False)
    train_member(tiny(steps=1, validate_every=1, model=smoothed, init_weights=initial, init_zero_head=True,
                      learning_rate=1e-7), tmp_path / "b", progress=False)
    saved = torch.load(Path(initial) / "weights.pt", weights_only=True)
    started = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert float(started["head.weight"].abs().max()) < 1e-5 < float(saved["head.weight"].abs().max())
    assert float((started["encoders.0.0.weight"] - saved["encoders.0.0.weight"]).abs().max()) < 1e-5


def test_a_zeroed_head_needs_initial_weights():
    with pytest.raises(ConfigError, match="init_zero_head"):
        tiny(init_zero_head=True)


def test_staging_left_by_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path):
    """A killed run cannot clean up its staging folder; the next run removes it (its process is
    gone) and leaves a running one's alone."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / "w" / f".nucleus.staging-{int(finished.stdout)}"
    alive = tmp_path / "w" / f".nucleus.staging-{os.getppid()}"
    for folder in (dead, alive):
        (folder / "member_0").mkdir(parents=True)
    train_ensemble(tiny(steps=2, validate_every=2), runs_dir=tmp_path / "r", weights_dir=tmp_path / "w",
                   members=1, progress=False, calibrate=False)
    assert not dead.exists() and alive.is_dir()
    assert (tmp_path / "w" / "nucleus" / "manifest.json").is_file()


def test_no_calibration_between_phases(tmp_path):
    train_ensemble(tiny(steps=2, validate_every=2), runs_dir=tmp_path / "r", weights_dir=tmp_path / "w",
                   members=1, progress=False, calibrate=False)
    manifest = json.loads((tmp_path / "w" / "nucleus" / "manifest.json").read_text())
    assert manifest["gate"] is None and "gate_calibration" not in manifest["info"]


def test_randomised_content_changes_the_target_with_the_view(rng):
    """With content randomisation the target is the randomised clean volume, not the original."""
    clean = np.zeros((16, 32, 32), np.float32)
    clean[4:12, 8:24, 8:24] = 1.0
    clean += rng.random(clean.shape).astype(np.float32) * 0.1
    config = tiny(patch=[16, 32, 32], simulator={"content_gamma": [3.0, 3.0]}, foreground_fraction=0.0,
                  pmin=[2.0, 2.0], pmax=[99.8, 99.8])
    _, target = SimulatedPairs("v", clean, (1.0, 1.0, 1.0), config).sample(np.random.default_rng(0))
    plain = tiny(patch=[16, 32, 32], foreground_fraction=0.0, pmin=[2.0, 2.0], pmax=[99.8, 99.8])
    _, plain_target = SimulatedPairs("v", clean, (1.0, 1.0, 1.0), plain).sample(np.random.default_rng(0))
    assert target.shape == plain_target.shape
    # gamma 3 pushes the dim texture toward 0 relative to the bright block
    assert np.median(target) < np.median(plain_target) - 0.05


def test_zoomed_training_views_keep_the_patch_shape_and_vary_the_structure_size(rng):
    """With ``content_zoom`` each simulation resamples the clean volume first; patches keep their shape."""
    clean = np.zeros((24, 48, 48), np.float32)
    clean[:, ::8, :] = 1.0  # membranes every 8 voxels along y: 4 periods per patch unzoomed
    clean = ndimage.gaussian_filter1d(clean, 2.0, axis=1, mode="wrap")  # the fundamental dominates
    config = tiny(patch=[16, 32, 32], simulator={"content_zoom": [0.5, 2.0]}, foreground_fraction=0.0,
                  resimulate_every=1)
    source = SimulatedPairs("v", clean, (1.0, 1.0, 1.0), config)
    draws = np.random.default_rng(0)
    periods = set()
    for _ in range(6):
        view, target = source.sample(draws)
        assert view.shape == target.shape == (16, 32, 32)
        # augmentation may turn the membranes by 90 degrees: the stronger of the two lateral profiles
        spectra = [np.abs(np.fft.rfft(p - p.mean())) for p in (target.mean(axis=(0, 2)), target.mean(axis=(0, 1)))]
        periods.add(int(np.argmax(max(spectra, key=np.max))))
    assert len(periods) > 1  # the membranes' spacing in voxels changed between simulations


def test_generalise_configs_train_and_validate_only_on_their_split(shared_data):
    """The held-out protocol holds only if the shipped recipe never touches a test volume."""
    split = load_split(REPO / "train" / "splits" / "heldout.json", shared_data)
    recipes = {p: TrainConfig.load(p) for p in sorted((REPO / "train" / "configs").glob("*.json"))}
    assert {config.channel for config in recipes.values()} == {"membrane", "nucleus"}
    for path, config in recipes.items():
        channel = config.channel
        assert path.stem.endswith(channel) and not config.validate_on_training_volumes
        assert [Path(f).name for f in config.clean_files] == [p.name for p in split[channel]["train"]]
        assert [Path(f).name for f in config.validation_files] == [p.name for p in split[channel]["validation"]]
        wanted = config.content_channels or (channel,)  # no training volume skipped for its channel
        assert all(inspect_case(shared_data / Path(f).name).meta.channel in wanted for f in config.clean_files), path
    for path in (REPO / "train" / "configs" / "archive").glob("*.json"):  # the earlier split's: still valid
        TrainConfig.load(path)


def test_randomised_validation_views_group_with_their_volume():
    config = tiny(validation_randomised_views=2, simulator={"bright_objects": [1, 1]})
    _, validation = build_data(config, validation_only=True)
    names = [v.name for v in validation]
    assert names[0] == "validation phantom 0" and len(names) == 3
    assert all("randomised content" in n for n in names[1:])
    assert {volume_of(n) for n in names} == {"validation phantom 0"}
    # the randomised targets are in signal units (p99.8 of the clean volume = 1) and carry the
    # bright object, at 2-8x that level
    for case in validation[1:]:
        assert case.target.max() >= 2.0 - 1e-6


# --------------------------------------------------------------------------- issue 10: no silent data loss


def _strict_json(path):
    """Parse as a strict JSON parser would: NaN/Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def fake_training(monkeypatch):
    """``train_member`` replaced by one that saves an untrained tiny network as a step-5 best
    checkpoint (``best`` overrides its metrics): the export path without minutes of training."""
    from fusecare.restoration.model import CareUNet
    from fusecare.training import loop, members

    calls: list[str] = []

    def fake(config, run_dir, *, resume=False, progress=True, data=None, best=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = best if best is not None else {"step": 5, "loss": 0.1, "val_loss": 0.1, "val_nssim_mean": 0.2}
        torch.manual_seed(config.seed)
        torch.save({"model": CareUNet(config.model).state_dict(), "step": metrics["step"], "metrics": metrics},
                   run_dir / loop.CHECKPOINT_BEST)
        calls.append(run_dir.name)
        return loop.MemberResult(run_dir=run_dir, best=metrics, steps=config.steps, seconds=0.0)

    monkeypatch.setattr(members, "train_member", fake)
    fake.calls = calls
    return fake


def test_members_below_one_is_refused_and_nothing_written(tmp_path, fake_training):
    with pytest.raises(ConfigError, match="members"):
        train_ensemble(tiny(), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w", members=0, progress=False)
    assert not (tmp_path / "w").exists() and fake_training.calls == []


def test_existing_ensemble_is_refused_before_any_data_is_read(tmp_path, fake_training, monkeypatch):
    from conftest import make_tiny_ensemble

    from fusecare.training import members

    folder = make_tiny_ensemble(tmp_path / "w", "nucleus")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.setattr(members, "build_data", lambda *a, **k: pytest.fail("data read before the refusal"))
    with pytest.raises(TrainingError, match="--overwrite"):
        train_ensemble(tiny(), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w", members=1, progress=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_overwrite_writes_a_complete_ensemble_without_stale_members(tmp_path, fake_training):
    from conftest import make_tiny_ensemble

    folder = make_tiny_ensemble(tmp_path / "w", "nucleus", members=2)
    train_ensemble(tiny(validation_phantoms=0), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w",
                   members=1, progress=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "member_0"]
    manifest = _strict_json(folder / "manifest.json")
    assert manifest["members"] == ["member_0"]
    assert len(load_ensemble(folder).members) == 1
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["nucleus"]  # no staging folder left


def test_an_ensemble_without_validation_is_written_with_a_warning_that_it_has_no_safety_net(
        tmp_path, fake_training, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        train_ensemble(tiny(validation_phantoms=0), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w",
                       members=1, progress=False)
    assert _strict_json(tmp_path / "w" / "nucleus" / "manifest.json")["gate"] is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("no validation case, so no safety net")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # asked for: no warning
        train_ensemble(tiny(validation_phantoms=0), runs_dir=tmp_path / "runs2", weights_dir=tmp_path / "w2",
                       members=1, progress=False, calibrate=False)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_new_empty_folder_is_written_without_overwrite(tmp_path, fake_training):
    (tmp_path / "w" / "nucleus").mkdir(parents=True)
    train_ensemble(tiny(validation_phantoms=0), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w",
                   members=2, progress=False)
    assert len(load_ensemble(tmp_path / "w" / "nucleus").members) == 2


@pytest.mark.parametrize("best", [
    {"step": 0, "loss": float("nan"), "val_loss": 0.3, "val_nssim_mean": 0.1},
    {"step": 7, "loss": float("nan"), "val_loss": float("nan"), "val_nssim_mean": 0.1},
    {"step": 7, "loss": 0.1, "val_loss": 0.1, "val_nssim_mean": float("inf")},
])
def test_untrained_or_non_finite_member_is_never_exported(tmp_path, fake_training, monkeypatch, best):
    from conftest import make_tiny_ensemble

    from fusecare.training import members as training

    folder = make_tiny_ensemble(tmp_path / "w", "nucleus", members=2)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    real = training.train_member
    monkeypatch.setattr(training, "train_member", lambda config, run_dir, **k: real(
        config, run_dir, **{**k, "best": best if config.seed == 1 else None}))
    with pytest.raises(TrainingError, match="step 0|non-finite"):
        train_ensemble(tiny(validation_phantoms=0), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w",
                       members=2, progress=False, overwrite=True)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # old ensemble intact
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["nucleus"]
    with pytest.raises(TrainingError, match="step 0|non-finite"):
        training.export_member(tmp_path / "runs" / "member_1", tmp_path / "x", tiny().replace(seed=1))
    assert not (tmp_path / "x").exists()


def test_step_0_is_never_the_best_checkpoint(tmp_path, monkeypatch):
    """The untrained network is logged (step 0 of log.csv) but never kept as the best."""
    from fusecare.training import loop

    scores = iter([0.9, 0.1, 0.2])  # the untrained network "validates" best of all
    monkeypatch.setattr(loop, "score_validation", lambda *a, **k: {"val_loss": 1.0, "val_nssim_mean": next(scores)})
    result = train_member(tiny(steps=4, validate_every=2), tmp_path / "run", progress=False)
    assert result.best["step"] == 4
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == 4


def test_written_json_is_strict(tmp_path, fake_training):
    train_ensemble(tiny(), runs_dir=tmp_path / "runs", weights_dir=tmp_path / "w", members=1, progress=False)
    for path in [tmp_path / "w" / "nucleus" / "manifest.json", tmp_path / "runs" / "member_0" / "config.json",
                 *(tmp_path / "w").rglob("*.json")]:
        if path.is_file():
            _strict_json(path)
    from fusecare.restoration.ensemble import write_manifest

    with pytest.raises(ValueError):
        write_manifest(tmp_path / "w" / "nucleus", "nucleus", info={"loss": float("nan")})


def _main(*args):
    from train.train import main

    return main([str(a) for a in args])


@pytest.mark.parametrize(("content", "words"), [
    (None, "config file not found"),
    ("[1, 2]", "must be a JSON object"),
    ('{"learning_rate": NaN, "phantoms": 1}', "'learning_rate' must be a finite number"),
    ('{"phantoms": 1, "ssim_weight": Infinity}', "'ssim_weight' must be a finite number"),
    ("{not json", "not valid JSON"),
])
def test_cli_bad_config_is_one_line_exit_2(tmp_path, caplog, content, words):
    config = tmp_path / "c.json"
    if content is not None:
        config.write_text(content)
    assert _main("--config", config, "--runs", tmp_path / "runs", "--weights", tmp_path / "w") == 2
    [record] = [r for r in caplog.records if r.levelno >= 40]
    assert words in record.getMessage() and "\n" not in record.getMessage() and record.exc_info is None
    assert not (tmp_path / "w").exists()


def test_cli_from_checkpoints_is_one_line_exit_2_for_a_bad_file_and_excludes_calibrate_only(tmp_path, caplog, capsys):
    config = tiny()
    config.save(tmp_path / "config.json")
    (tmp_path / "run").mkdir()
    config.save(tmp_path / "run" / "config.json")
    (tmp_path / "run" / "last.pt").write_text("not a torch file")
    with caplog.at_level("ERROR", logger="fusecare"):
        assert _main("--config", tmp_path / "config.json", "--weights", tmp_path / "w", "--quiet",
                     "--from-checkpoints", tmp_path / "run" / "last.pt") == 2
    assert "not a readable checkpoint of this network" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        _main("--calibrate-only", "--from-checkpoints", tmp_path / "run" / "last.pt")
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_calibrate_only_without_an_ensemble_is_exit_2(tmp_path, caplog):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(TINY))
    assert _main("--config", config, "--weights", tmp_path / "w", "--calibrate-only") == 2
    [record] = [r for r in caplog.records if r.levelno >= 40]
    assert "no ensemble to calibrate" in record.getMessage()


@pytest.mark.parametrize("members", ["0", "-1", "two"])
def test_cli_members_below_one_is_a_usage_error(members):
    with pytest.raises(SystemExit) as caught:
        _main("--members", members)
    assert caught.value.code == 2


# --------------------------------------------------------------------------- members that read the corrected view


def test_corrected_input_training_reads_each_view_times_its_own_field(tmp_path):
    """``model.corrected_input``: every simulated view's patches carry the field estimated on that
    whole view, every validation case its normalised view times its field, and a member that read
    views uncorrected may start such a run (the weights are the same shapes)."""
    from fusecare.restoration.attenuation import estimate_attenuation

    model = TINY["model"] | {"corrected_input": True}
    sources, validation = build_data(tiny(model=model))
    [source] = sources
    source.sample(np.random.default_rng(0))
    patches = source._patches
    assert patches.source_field is not None and patches.source_field.shape == patches.source.shape
    assert validation and all(case.member_input is not None for case in validation)
    for case in validation:
        norm = PercentileNorm.fit(case.source)
        field = estimate_attenuation(case.source, case.voxel_size_zyx, norm.forward).region((slice(None),) * 3)
        np.testing.assert_allclose(case.member_input, norm.forward(case.source) * field, rtol=1e-6)
        np.testing.assert_allclose(case.field, field, rtol=1e-6)
    _, plain_validation = build_data(tiny())
    assert all(case.member_input is None for case in plain_validation)
    train_ensemble(tiny(steps=1, validate_every=1), runs_dir=tmp_path / "a", weights_dir=tmp_path / "w",
                   members=1, progress=False, calibrate=False)
    result = train_member(tiny(steps=2, validate_every=2, model=model,
                               init_weights=str(tmp_path / "w" / "nucleus" / "member_0")),
                          tmp_path / "b", progress=False)
    assert TrainConfig.load(tmp_path / "b" / "config.json").model.corrected_input is True
    assert np.isfinite(result.best["val_nssim_mean"])


def test_a_corrected_input_member_is_validated_on_its_member_input():
    """The member predicts ``member_input`` (already normalised) instead of its view: a member
    that returns its input gives back exactly that."""
    from fusecare.restoration.model import CareUNet
    from fusecare.training.loop import _predict_volume
    from fusecare.training.sources import ValidationCase

    rng = np.random.default_rng(3)
    source = (100 + 1000 * rng.random((8, 32, 32))).astype(np.float32)
    member_input = rng.random((8, 32, 32)).astype(np.float32) * 3
    case = ValidationCase("c", source, source, member_input=member_input)
    for corrected, expected in ((True, member_input), (False, PercentileNorm.fit(source).forward(source))):
        model = CareUNet(ModelConfig(first_filters=4, depth=1, corrected_input=corrected))
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)  # the residual net returns its input
        np.testing.assert_allclose(_predict_volume(model.eval(), case, torch.device("cpu")), expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs its member_input"):
        _predict_volume(CareUNet(ModelConfig(first_filters=4, depth=1, corrected_input=True)),
                        ValidationCase("c", source, source), torch.device("cpu"))



@pytest.mark.parametrize("corrected", [False, True])
def test_a_gated_validation_scores_what_the_gate_makes_of_the_prediction(corrected):
    """``gated_validation_score`` against the gate's formula: half blend of the normalised view
    and the prediction, and, for a member that reads the corrected view, of the view and the
    prediction divided by the case's field, the field multiplied back."""
    from fusecare.restoration.gate import GateConfig
    from fusecare.scoring.metrics import score_ssim
    from fusecare.training.loop import gated_validation_score
    from fusecare.training.sources import ValidationCase, with_member_input

    rng = np.random.default_rng(4)
    target = ndimage.gaussian_filter(rng.random((16, 32, 32)), 2).astype(np.float32) * 1000
    source = (100 + target * np.exp(-0.05 * np.arange(32))[None, None, :] + 20 * rng.random(target.shape))
    case = with_member_input(ValidationCase("v.tif view 0", source.astype(np.float32), target))
    x = PercentileNorm.fit(case.source).forward(case.source)
    prediction = ndimage.gaussian_filter(case.member_input if corrected else x, 1.0)
    gate = GateConfig.from_dict(HALF_BLEND | {"correct_attenuation": corrected})
    expected = (0.5 * x + 0.5 * prediction / case.field) * case.field if corrected else 0.5 * x + 0.5 * prediction
    score = gated_validation_score(case, prediction, gate, corrected)
    assert score == pytest.approx(score_ssim(target, expected, source).n_ssim, abs=1e-5)
    keep_all = gate.replace(blend=1.0)
    kept = gated_validation_score(case, prediction, keep_all, corrected)
    assert kept == pytest.approx(score_ssim(target, prediction, source).n_ssim, abs=1e-5)
    if corrected:  # as inference, a member that reads the corrected view always gets the field back
        uncorrecting = gate.replace(correct_attenuation=False)
        assert gated_validation_score(case, prediction, uncorrecting, True) == pytest.approx(score, abs=1e-6)
        with pytest.raises(ValueError, match="needs its field"):
            gated_validation_score(ValidationCase("c", source, target), prediction, gate, True)


def test_checkpoints_are_chosen_on_the_gated_score_with_a_validation_gate(tmp_path, caplog):
    """With ``validation_gate`` the log gains the gated columns and the best checkpoint is the
    best gated score; a run resumed with a gate does not compare it with its ungated best."""
    assert _score({"val_loss": 1.0, "val_nssim_mean": 0.1, "val_nssim_weighted": 0.3, "val_nssim_gated": 0.2}) == 0.2
    gate = HALF_BLEND | {"correct_attenuation": False}
    config = tiny(steps=4, validate_every=2, learning_rate=3e-3, validation_gate=gate)
    train_member(config, tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    gated = {int(r["step"]): float(r["val_nssim_gated"]) for r in rows}
    assert set(gated) == {0, 2, 4} and all(np.isfinite(v) for v in gated.values())
    assert all(float(r["val_nssim_gated_min"]) <= float(r["val_nssim_gated"]) for r in rows)
    assert any(abs(float(r["val_nssim_gated"]) - float(r["val_nssim_mean"])) > 1e-4 for r in rows)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    best_step = max((2, 4), key=gated.get)  # step 0 is never the best from random weights
    assert state["score_metric"] == "val_nssim_gated" and state["best_score"] == pytest.approx(gated[best_step])
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == best_step
    train_member(tiny(steps=2, validate_every=2), tmp_path / "plain", progress=False)
    train_member(config, tmp_path / "plain", resume=True, progress=False)
    assert torch.load(tmp_path / "plain" / "best.pt", weights_only=False)["step"] == 4
    # scores through another gate do not compare either: resumed with a full blend (which scores this
    # barely trained net lower than half of it did), the next validated step is the best
    train_member(config.replace(steps=2), tmp_path / "half", progress=False)
    with caplog.at_level("WARNING", logger="fusecare"):
        train_member(config.replace(steps=4, learning_rate=1e-9, validation_gate=gate | {"blend": 1.0}),
                     tmp_path / "half", resume=True, progress=False)
    assert "'blend': 1.0" in caplog.text and "the next validated checkpoint becomes the best" in caplog.text
    assert torch.load(tmp_path / "half" / "best.pt", weights_only=False)["step"] == 4
    # a last.pt written before the settings were recorded is taken to share them: its best stands
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    del state["score_settings"]
    torch.save(state | {"best_score": 10.0}, tmp_path / "run" / "last.pt")
    train_member(config.replace(steps=6), tmp_path / "run", resume=True, progress=False)
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=False)["step"] == best_step


def test_a_log_without_rows_or_without_a_header_gets_a_consistent_one(tmp_path):
    from fusecare.training.loop import _append_csv

    row = {"step": 2, "loss": 0.1, "lr": 1e-3, "seconds": 1.0, "val_loss": 0.2, "val_mae": 0.1,
           "val_nssim_mean": 0.3, "val_nssim_min": 0.1, "val_nssim_gated": 0.5, "val_nssim_gated_min": 0.4}
    header_only = tmp_path / "header.csv"
    header_only.write_text("step,loss,lr,seconds,val_loss,val_mae,val_nssim_mean,val_nssim_min\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for path in (header_only, empty):
        _append_csv(path, row)
        [logged] = list(csv.DictReader(path.open()))
        assert logged["val_nssim_gated"] == "0.5" and logged["step"] == "2"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_validation_gate_must_use_the_prediction_and_a_correcting_one_gets_each_field_once():
    with pytest.raises(ConfigError, match="validation_gate' ignores the prediction"):
        tiny(validation_gate={"blend": 0.0})
    _, cases = build_data(tiny(validation_gate=HALF_BLEND | {"correct_attenuation": True}), validation_only=True)
    assert cases and all(c.field is not None and c.member_input is None for c in cases)
    _, cases = build_data(tiny(validation_gate=HALF_BLEND), validation_only=True)
    assert all(c.field is None for c in cases)


def test_an_ensemble_assembled_from_chosen_checkpoints_names_them_and_loads(tmp_path):
    """``--from-checkpoints``: member k holds the k-th checkpoint's weights (a last.pt of one run,
    the best.pt of another), its training.json names the checkpoint, its step and the run's log
    row, the gate is calibrated, and nothing is written over an ensemble without --overwrite."""
    from fusecare.training.members import assemble_ensemble

    config = tiny(steps=4, validate_every=2)
    train_member(config, tmp_path / "a", progress=False)
    train_member(config.replace(seed=1), tmp_path / "b", progress=False)
    chosen = [tmp_path / "a" / "last.pt", tmp_path / "b" / "best.pt"]
    config.save(tmp_path / "config.json")
    assert _main("--config", tmp_path / "config.json", "--weights", tmp_path / "w", "--quiet",
                 "--from-checkpoints", *chosen) == 0
    folder = tmp_path / "w" / "nucleus"
    ensemble = load_ensemble(folder)
    for member, checkpoint in zip(ensemble.members, chosen):
        weights = torch.load(checkpoint, weights_only=False)["model"]
        assert all(torch.equal(weights[k], v) for k, v in member.state_dict().items())
    record = _strict_json(folder / "member_0" / "training.json")
    logged = list(csv.DictReader((tmp_path / "a" / "log.csv").open()))[-1]
    assert record["checkpoint"] == str(chosen[0]) and record["step"] == record["logged"]["step"] == 4
    assert record["logged"]["val_nssim_mean"] == pytest.approx(float(logged["val_nssim_mean"]))
    # a last.pt whose run no longer keeps its best.pt (pruned) is still a checkpoint to assemble from
    (tmp_path / "a" / "best.pt").unlink()
    assemble_ensemble(config, chosen[:1], weights_dir=tmp_path / "w3", calibrate=False, progress=False)
    state = torch.load(chosen[0], weights_only=False)
    state["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "a" / "diverged.pt")
    with pytest.raises(TrainingError, match="non-finite weights"):
        assemble_ensemble(config, [tmp_path / "a" / "diverged.pt"], weights_dir=tmp_path / "w4", progress=False)
    manifest = _strict_json(folder / "manifest.json")
    assert manifest["info"]["checkpoints"] == [str(c) for c in chosen] and manifest["gate"] is not None
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="--overwrite"):
        assemble_ensemble(config, chosen[::-1], weights_dir=tmp_path / "w", calibrate=False, progress=False)
    other = tiny(model={"first_filters": 8, "depth": 1})
    with pytest.raises(ConfigError, match="its model"):
        assemble_ensemble(other, chosen, weights_dir=tmp_path / "w2", calibrate=False, progress=False)
    with pytest.raises(ConfigError, match="not a checkpoint in a run folder"):
        assemble_ensemble(config, [tmp_path / "nothing.pt"], weights_dir=tmp_path / "w2", progress=False)
    with pytest.raises(ConfigError, match="an exported member, not a run's checkpoint"):
        assemble_ensemble(config, [folder / "member_0" / "weights.pt"], weights_dir=tmp_path / "w2", progress=False)
    (tmp_path / "a" / "broken.pt").write_text("not a torch file")
    torch.save({"step": 4}, tmp_path / "a" / "no_model.pt")
    for name in ("broken.pt", "no_model.pt"):
        with pytest.raises(ConfigError, match="not a readable checkpoint of this network"):
            assemble_ensemble(config, [tmp_path / "a" / name], weights_dir=tmp_path / "w2", progress=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "w2" / "nucleus").exists()

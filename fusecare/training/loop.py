"""Training one CARE member: the optimisation loop, its checkpoints and its validation.

``train_member`` trains one network and keeps the best (highest validation N-SSIM) and last
checkpoints, resumable, with a CSV log. Under ``torchrun`` the same code runs
DistributedDataParallel (gloo on CPU, NCCL on CUDA; ``training.distributed``).
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fusecare.device import resolve_device
from fusecare.errors import ConfigError, InputError
from fusecare.normalize import NORMALISED
from fusecare.restoration.gate import GateConfig
from fusecare.restoration.model import CareUNet, ModelConfig
from fusecare.restoration.tiling import predict_normalised
from fusecare.scoring.metrics import score_ssim
from fusecare.training.calibration import ValidationPrediction, evaluate_candidates
from fusecare.training.config import TrainConfig
from fusecare.training.distributed import barrier, mean_over_ranks, setup_distributed
from fusecare.training.losses import training_loss
from fusecare.training.sources import (
    PatchSource,
    ValidationCase,
    build_data,
    draw_batch,
    source_probabilities,
    validation_score,
)

log = logging.getLogger(__name__)


def _resume_state(path: Path, rank: int, world: int) -> dict[str, Any] | None:
    """The checkpoint to resume from, as rank 0 reads it, on every rank.

    Ranks need not share the run folder: rank 0's copy (or its absence) decides, so no rank starts
    at another step (a hang at the first collective) or from different weights or optimizer state.
    """
    state = torch.load(path, map_location="cpu", weights_only=False) if rank == 0 and path.is_file() else None
    if world > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def _rank_rng(config: TrainConfig, rank: int, saved: Sequence[Any] | None, step: int) -> np.random.Generator:
    """Rank ``rank``'s patch stream: its own saved state, or (a rank the checkpoint did not have,
    after resuming with more processes) a fresh stream that no other rank or earlier run drew."""
    if saved is not None and rank < len(saved):
        rng = np.random.default_rng()
        rng.bit_generator.state = saved[rank]
        return rng
    return np.random.default_rng([config.seed, rank] + ([step] if step else []))


def _predict_volume(model: CareUNet, case: ValidationCase, device: torch.device) -> np.ndarray:
    """One member's normalised prediction of a validation volume: of its view, or of its
    ``member_input`` (already normalised, the field applied) for a member that reads corrected views."""
    config = model.config
    volume, norm = case.source, None
    if config.corrected_input:
        if case.member_input is None:
            raise ValueError(f"validation case {case.name}: a corrected-input member needs its member_input")
        volume, norm = case.member_input, NORMALISED

    @torch.inference_mode()
    def predict(block: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(block)[None, None].to(device))[0, 0].float().cpu().numpy()

    return predict_normalised(volume, predict, margin=config.tiling_margin, align=config.alignment,
                              device_type=device.type, norm=norm)  # type: ignore[return-value]


def score_validation(model: CareUNet, patches: tuple[torch.Tensor, torch.Tensor], cases: Sequence[ValidationCase],
                     config: TrainConfig, device: torch.device, phantom_share: float | None = None
                     ) -> dict[str, float]:
    """Validation loss and MAE on fixed patches, and N-SSIM per validation volume (also weighed by
    content, ``validation_score``, with the ``phantom_share`` training draws with), ungated and,
    with ``config.validation_gate``, through that gate (``gated_validation_score``; its mean
    ``val_nssim_gated`` is weighed by content as ``val_nssim_weighted`` is, when there is a share)."""
    model.eval()
    with torch.inference_mode():
        x, y = patches[0].to(device), patches[1].to(device)
        out = model(x)
        result = {"val_loss": float(training_loss(out, y, loss=config.loss, ssim_weight=config.ssim_weight)),
                  "val_mae": float((out[:, :1] - y).abs().mean())}
    per_case = [member_case_scores(model, case, config.validation_gate, device) for case in cases]
    scores = [ungated for ungated, _ in per_case]
    gated = [score for _, score in per_case if score is not None]
    if scores:
        result.update(val_nssim_mean=float(np.mean(scores)), val_nssim_min=float(np.min(scores)))
        if phantom_share is not None:
            result["val_nssim_weighted"] = validation_score(cases, scores, phantom_share)
    if gated:
        result.update(val_nssim_gated=validation_score(cases, gated, phantom_share),
                      val_nssim_gated_min=float(np.min(gated)))
    model.train()
    return result


def member_case_scores(model: CareUNet, case: ValidationCase, gate: GateConfig | None,
                       device: torch.device) -> tuple[float, float | None]:
    """One validation case's N-SSIM for one member: ungated, and through ``gate`` (None without),
    from one whole-volume prediction (held only while this case is scored)."""
    prediction = _predict_volume(model, case, device)
    ungated = score_ssim(case.target, prediction, case.source).n_ssim
    if gate is None:
        return ungated, None
    return ungated, gated_validation_score(case, prediction, gate, model.config.corrected_input)


def gated_validation_score(case: ValidationCase, prediction: np.ndarray, gate: GateConfig,
                           corrected_input: bool) -> float:
    """N-SSIM of one member's whole-volume prediction through ``gate``, with the code calibration
    scores gates with (``evaluate_candidates``): no spread (one member); a member that reads the
    corrected view is divided by its case's field first, and the gate puts the field back, as
    inference does (``restore_volume`` makes such a member's gate correct attenuation)."""
    field = case.field
    if corrected_input:
        if field is None:
            raise ValueError(f"validation case {case.name}: a corrected-input member needs its field")
        gate, prediction = gate.replace(correct_attenuation=True), prediction / field
    member = ValidationPrediction(case.name, case.source, case.target, prediction, np.zeros_like(prediction),
                                  case.voxel_size_zyx, field)
    [result] = evaluate_candidates([member], [gate], corrected_input=corrected_input, ungated=False)
    return result.n_ssim[0]


CHECKPOINT_BEST, CHECKPOINT_LAST, LOG_NAME = "best.pt", "last.pt", "log.csv"


@dataclass(frozen=True)
class MemberResult:
    run_dir: Path
    best: dict[str, float]
    steps: int
    seconds: float


SCORE_METRICS = ("val_nssim_gated", "val_nssim_weighted", "val_nssim_mean", "val_loss")
"""What the best checkpoint is chosen on, the first a validation has: N-SSIM through the
``validation_gate`` (weighed as below when training draws phantoms with a share), N-SSIM weighed by
content, the mean N-SSIM, minus the loss (no validation volume)."""


def _score_metric(metrics: dict[str, Any]) -> str:
    return next(name for name in SCORE_METRICS if name in metrics)


def _chosen_metric(config: TrainConfig, has_cases: bool, weighted: bool) -> str:
    """The ``SCORE_METRICS`` entry this run chooses its best checkpoint on."""
    if not has_cases:
        return "val_loss"
    if config.validation_gate is not None:
        return "val_nssim_gated"
    return "val_nssim_weighted" if weighted else "val_nssim_mean"


def _described(metric: str, settings: dict[str, Any]) -> str:
    """A score metric with what it was computed with, for a log line."""
    given = {k: v for k, v in settings.items() if v is not None}
    return metric + (f" ({given})" if given else "")


def _score(metrics: dict[str, float]) -> float:
    """Higher is better: the first of ``SCORE_METRICS`` present (the loss negated)."""
    name = _score_metric(metrics)
    return -metrics[name] if name == "val_loss" else metrics[name]


def train_member(config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True, data: tuple[list[PatchSource], list[ValidationCase]] | None = None
                 ) -> MemberResult:
    """Train one member into ``run_dir`` (config.json, best.pt, last.pt, log.csv)."""
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    rank, world, device = setup_distributed(device)
    sources, cases = data if data is not None else build_data(config)
    rng = np.random.default_rng([config.seed, rank])
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = CareUNet(config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=config.lr_patience)
    probabilities = source_probabilities(sources, config.phantom_share)
    weighting = config.phantom_share if probabilities is not None else None  # validation weighs as training draws
    score_metric = _chosen_metric(config, bool(cases), weighting is not None)
    score_settings = {"validation_gate": config.validation_gate.to_dict() if config.validation_gate else None,
                      "phantom_share": weighting}
    val_patches = draw_batch(sources, config.validation_patches, np.random.default_rng([config.seed, 99]),
                             probabilities)
    start_step, best_score, best = 0, -np.inf, {}
    case_names = [case.name for case in cases]
    last_path = run_dir / CHECKPOINT_LAST
    state = _resume_state(last_path, rank, world) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, best_score, best = state["step"], state["best_score"], state["best"]
        saved_metric = state.get("score_metric") or (_score_metric(best) if best else score_metric)
        saved_settings = state.get("score_settings", score_settings)  # unrecorded before the gate existed
        if saved_metric != score_metric or saved_settings != score_settings:
            if rank == 0:
                log.warning("%s: its best checkpoint so far was chosen on %s, this run chooses on %s (the "
                            "config changed): the next validated checkpoint becomes the best", run_dir,
                            _described(saved_metric, saved_settings), _described(score_metric, score_settings))
            best_score = -np.inf
        elif best and sorted(state.get("validation_cases") or ()) != sorted(case_names):
            # scores of other validation cases do not compare (a split that gained a volume, say)
            if rank == 0:
                log.warning("%s: its best checkpoint so far was chosen on %s, this run validates on %d "
                            "cases: the next validated checkpoint becomes the best", run_dir,
                            "unrecorded validation cases" if state.get("validation_cases") is None
                            else "other validation cases", len(case_names))
            best_score = -np.inf
        rng = _rank_rng(config, rank, state["rng"], start_step)
        saved_world = len(state["rng"])
        log.info("resumed %s at step %d%s", run_dir, start_step,
                 f" ({saved_world} rank(s) saved, {world} now)" if saved_world != world else "")
    elif config.init_weights:
        model.load_state_dict(_initial_state(config))
        if config.init_zero_head:
            with torch.no_grad():
                model.head.weight.zero_()
                model.head.bias.zero_()
        log.info("%s starts from the weights of %s%s", run_dir, config.init_weights,
                 ", head zeroed: at its residual base" if config.init_zero_head else "")
    net: torch.nn.Module = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
    started = time.perf_counter()

    def checkpoint(done: int, loss: float) -> None:
        """Validate (rank 0), step the schedule (every rank), log, keep best and last."""
        nonlocal best_score, best
        loss = mean_over_ranks(loss, device, world)
        states = [rng.bit_generator.state]
        if world > 1:  # every rank's patch stream goes into last.pt, in rank order
            states = [None] * world
            dist.all_gather_object(states, rng.bit_generator.state)
        metrics = (score_validation(model, val_patches, cases, config, device, weighting) if rank == 0
                   else {"val_loss": 0.0})
        if world > 1:  # every rank steps its scheduler alike
            shared = torch.tensor([metrics["val_loss"]], device=device)
            dist.broadcast(shared, 0)
            metrics["val_loss"] = float(shared)
        if done > 0:
            scheduler.step(metrics["val_loss"])
        if rank == 0:
            save(done, loss, metrics, states)
        barrier()  # no rank runs ahead of (or exits before) a checkpoint that is being written

    def save(done: int, loss: float, metrics: dict[str, float], states: list[Any]) -> None:
        nonlocal best_score, best
        row = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - started, 1), **metrics}
        _append_csv(run_dir / LOG_NAME, row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
        # step 0 is logged; it may be the best only when it is a warm start, not random weights
        if (done > 0 or config.init_weights) and _score(metrics) > best_score:
            best_score, best = _score(metrics), dict(row)
            torch.save({"model": model.state_dict(), "step": done, "metrics": row}, run_dir / CHECKPOINT_BEST)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": done, "best_score": best_score,
                    "score_metric": score_metric, "score_settings": score_settings,
                    "validation_cases": case_names,
                    "best": best, "rng": states}, last_path)

    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc=f"train {run_dir.name}", disable=not progress or rank != 0, unit="step")
    if start_step == 0:
        checkpoint(0, float("nan"))  # the untrained baseline: step 0 of the log
    model.train()
    for step in bar:
        x, y = draw_batch(sources, config.batch_size, rng, probabilities)
        loss = training_loss(net(x.to(device)), y.to(device), loss=config.loss, ssim_weight=config.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % config.validate_every == 0 or done == config.steps:
            checkpoint(done, float(loss.detach()))
    if world > 1:  # every rank returns rank 0's record of the best checkpoint
        box = [best]
        dist.broadcast_object_list(box, src=0)
        best = box[0]
    return MemberResult(run_dir=run_dir, best=best, steps=config.steps, seconds=time.perf_counter() - started)


def _initial_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of ``config.init_weights`` (a member folder), checked against ``config.model``."""
    folder = Path(config.init_weights)
    weights = folder / "weights.pt" if folder.is_dir() else folder
    if not weights.is_file():
        raise InputError(f"init_weights {config.init_weights}: no weights.pt there")
    member_config = folder / "config.json" if folder.is_dir() else weights.with_name("config.json")
    if member_config.is_file():
        saved = ModelConfig.load(member_config)
        if config.init_zero_head:  # the base is not a weight; with the head zeroed it starts afresh
            saved = saved.replace(base_sigma=config.model.base_sigma)
        # what the member reads (the view, or the view times its field) is not a weight either
        saved = saved.replace(corrected_input=config.model.corrected_input)
        if saved != config.model:
            raise ConfigError(f"init_weights {config.init_weights}: its model {saved.to_dict()} differs "
                              f"from the config's {config.model.to_dict()}")
    return torch.load(weights, map_location="cpu", weights_only=True)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append one validation row to a run's log. A resumed log keeps its columns; when the row
    brings new ones (a run resumed with a validation gate, say) the log is rewritten with them,
    blank in its earlier rows, through a temporary file, so that a kill leaves the old log whole."""
    fields = ["step", "loss", "lr", "seconds", "val_loss", "val_mae", "val_nssim_mean", "val_nssim_min",
              *(["val_nssim_weighted"] if "val_nssim_weighted" in row else []),
              *(["val_nssim_gated", "val_nssim_gated_min"] if "val_nssim_gated" in row else [])]
    rows: list[dict[str, str]] = []
    logged: list[str] = []
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows, logged = list(reader), list(reader.fieldnames or [])
    if logged:
        added = [name for name in fields if name not in logged]
        fields = logged + added
        if added:
            log.info("%s gains the columns %s (blank in its %d earlier rows)", path, added, len(rows))
            staged = path.with_name(path.name + ".tmp")
            with staged.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(staged, path)
    with path.open("a" if logged else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not logged:  # a new (or empty) log
            writer.writeheader()
        writer.writerow(row)

"""Training CARE members on Fuse My Cells pairs, on pairs simulated from clean volumes, or both.

One ``TrainConfig`` (validated, saved as ``config.json`` in the run folder and as
``training.json`` beside each member's weights) describes a run. ``train_member`` trains one
network and keeps the best (highest validation N-SSIM) and last checkpoints, resumable, with a
CSV log; ``train_ensemble`` trains K members with different seeds into the layout inference
reads. Under ``torchrun`` the same code runs DistributedDataParallel (gloo on CPU, NCCL on
CUDA): every rank draws its own random patches from its own seed stream (the random-patch
equivalent of a distributed sampler), rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm.auto import tqdm

from fusecare.config import Config, param
from fusecare.constants import DEFAULT_TILE
from fusecare.data import PairPatches, PatchConfigView, check_clean_volume, discover_fmc_pairs, split_by_study
from fusecare.device import resolve_device
from fusecare.calibration import GateCandidate, calibrate_gate, cross_validate, predict_validation
from fusecare.ensemble import MANIFEST, Ensemble, load_ensemble, read_manifest, save_member, write_manifest
from fusecare.errors import ConfigError, InputError, TrainingError, WeightsError
from fusecare.gate import GateConfig
from fusecare.io import CHANNELS, NUCLEUS, CaseInfo, inspect_case, list_cases, open_volume, opened_volume, read_case
from fusecare.metrics import score_ssim
from fusecare.model import CareUNet, ModelConfig
from fusecare.normalize import PercentileNorm
from fusecare.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom, nuclei_phantom
from fusecare.simulate import SimulatorConfig, randomise_content, simulate_single_view
from fusecare.tiling import predict_tiled

log = logging.getLogger(__name__)

LOSSES = ("mae", "mse", "laplace")
VALIDATION_CROP = (64, 256, 256)
"""Validation volumes are centre-cropped to this, so a validation pass stays short."""


class TrainConfig(Config):
    """Everything one training run needs; saved beside what it produced."""

    channel: str = param(NUCLEUS, doc="Which ensemble this trains.", choices=CHANNELS)
    model: ModelConfig = param(ModelConfig(), doc="Network of each member (see ModelConfig).")
    fmc_dir: str = param("", doc="Folder of FMC pairs image_<id>_<channel>_angle/fused.tif ('' = none).")
    validation_studies: tuple[int, ...] = param((), doc="FMC studies held out for validation.", ge=0)
    clean_dir: str = param("", doc="Folder of clean volumes to simulate single views from ('' = none).")
    clean_files: tuple[str, ...] = param((), doc="Clean volume files, beside or instead of clean_dir.")
    validation_files: tuple[str, ...] = param(
        (), doc="Clean volumes used only for validation (checkpoint choice, gate calibration): "
        "whole volumes never trained on, so the choice measures generalisation, not recall.")
    validation_views: int = param(1, doc="Single views simulated per validation volume (seeds 10000+).",
                                  ge=1, le=64)
    validation_randomised_views: int = param(
        0, doc="Extra views per validation volume (and phantom) whose content is first randomised by "
        "the training simulator's content settings (bright saturated objects, gamma, sparse masks): "
        "the failure modes of unseen real content, made from validation volumes, so calibration "
        "sees them without touching a test volume.", ge=0, le=64)
    validate_on_training_volumes: bool = param(
        True, doc="Also validate on views simulated from the training volumes (seen content).")
    validation_simulator: SimulatorConfig | None = param(
        None, doc="Simulator of the validation views (null = the training simulator). Keep it the "
        "physical default when training on domain-randomised views.")
    init_weights: str = param("", doc="Weights that start training instead of a random initialisation: "
                              "a member folder (config.json + weights.pt), or an ensemble folder whose "
                              "member_<k> starts member k ('' = random). Not read when resuming.")
    phantoms: int = param(0, doc="Synthetic clean phantoms of this channel added to the content.",
                          ge=0, le=10_000)
    phantom_shape: tuple[int, int, int] = param((48, 128, 128), doc="Shape of each phantom (Z, Y, X).",
                                                ge=8, le=1024)
    validation_phantoms: int = param(2, doc="Extra phantoms (unseen seeds) used only for validation.",
                                     ge=0, le=100)
    simulator: SimulatorConfig = param(SimulatorConfig(), doc="Ranges of the single-view simulator.")
    resimulate_every: int = param(32, doc="Patches drawn from one simulated view before a new draw.",
                                  ge=1, le=100_000)
    patch: tuple[int, int, int] = param((32, 64, 64), doc="Training patch (Z, Y, X).", ge=4, le=1024)
    batch_size: int = param(4, doc="Patches per step (per process under torchrun).", ge=1, le=1024)
    steps: int = param(1000, doc="Optimiser steps.", ge=1, le=10_000_000)
    learning_rate: float = param(4e-4, doc="Adam learning rate (CARE: 4e-4).", gt=0.0, le=1.0)
    lr_patience: int = param(3, doc="Validations without improvement before the rate is halved.",
                             ge=1, le=1000)
    loss: str = param("mae", doc="Pixel loss: mae (CARE), mse, or laplace (needs a probabilistic model).",
                      choices=LOSSES)
    ssim_weight: float = param(0.0, doc="Weight of an added (1 - SSIM) term.", ge=0.0, le=10.0)
    validate_every: int = param(100, doc="Steps between validations.", ge=1, le=1_000_000)
    validation_patches: int = param(16, doc="Fixed patches for the validation loss.", ge=1, le=10_000)
    foreground_fraction: float = param(0.9, doc="Share of patches centred on foreground.", ge=0.0, le=1.0)
    pmin: tuple[float, float] = param((1.0, 3.0), doc="Low normalisation percentile, drawn per patch.",
                                      ge=0.0, le=50.0)
    pmax: tuple[float, float] = param((99.5, 99.9), doc="High normalisation percentile, drawn per patch.",
                                      ge=50.0, le=100.0)
    normalize_per_patch: bool = param(False, doc="Percentiles of the patch instead of the volume.")
    seed: int = param(0, doc="Seed of member 0; member k uses seed + k.", ge=0)
    device: str = param("auto", doc="auto, cpu, cuda or cuda:N.")

    def validate(self) -> None:
        if not (self.fmc_dir or self.clean_dir or self.clean_files or self.phantoms):
            raise ConfigError("no training data: set fmc_dir, clean_dir, clean_files or phantoms")
        if self.loss == "laplace" and not self.model.probabilistic:
            raise ConfigError("loss 'laplace' needs model.probabilistic = true")
        align = self.model.alignment
        if any(p % align for p in self.patch):
            raise ConfigError(f"config field 'patch' {list(self.patch)} must be multiples of {align} "
                              f"(2**model.depth)")

    def patch_settings(self) -> PatchConfigView:
        return PatchConfigView(patch=self.patch, foreground_fraction=self.foreground_fraction,
                               pmin=self.pmin, pmax=self.pmax,
                               normalize_per_patch=self.normalize_per_patch)


# --------------------------------------------------------------------------- data sources


class PatchSource(Protocol):
    name: str

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class RealPairs:
    """Patches of one real (input, target) pair, read lazily from memory maps."""

    name: str
    patches: PairPatches

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.patches.sample(rng)


class SimulatedPairs:
    """Patches of single views simulated from one clean volume, re-simulated every N draws."""

    def __init__(self, name: str, clean: np.ndarray, voxel_size: tuple[float, float, float],
                 config: TrainConfig) -> None:
        self.name, self.clean, self.voxel_size, self.config = name, clean, voxel_size, config
        self._patches: PairPatches | None = None
        self._draws = 0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self._patches is None or self._draws % self.config.resimulate_every == 0:
            simulator = self.config.simulator
            clean = (randomise_content(self.clean, self.voxel_size, simulator, rng)
                     if simulator.randomises_content else self.clean)
            view, _ = simulate_single_view(clean, self.voxel_size, config=simulator, seed=rng)
            self._patches = PairPatches(view, clean, self.config.patch_settings())
        self._draws += 1
        return self._patches.sample(rng)


@dataclass(frozen=True)
class ValidationCase:
    """A whole (input, target) volume pair scored with N-SSIM during training."""

    name: str
    source: np.ndarray
    target: np.ndarray


def _centre_crop(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    starts = [max(0, (n - s) // 2) for n, s in zip(volume.shape, shape)]
    return np.asarray(volume[tuple(slice(a, a + s) for a, s in zip(starts, shape))])


def _validation_crop(info: CaseInfo) -> np.ndarray:
    with opened_volume(info.path, info=info, memmap=True) as volume:
        return _centre_crop(volume, VALIDATION_CROP)


def _phantom(channel: str, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    make = nuclei_phantom if channel == NUCLEUS else membrane_phantom
    return make(shape, rng=np.random.default_rng(seed))


def _simulated_validation(name: str, clean: np.ndarray, voxel_size: tuple[float, float, float],
                          simulator: SimulatorConfig, seed: int | np.random.Generator) -> ValidationCase:
    """A validation case named ``name``: one single view simulated from a whole clean volume,
    both centre-cropped to ``VALIDATION_CROP``."""
    view, _ = simulate_single_view(clean, voxel_size, config=simulator, seed=seed)
    return ValidationCase(name, _centre_crop(view, VALIDATION_CROP), _centre_crop(clean, VALIDATION_CROP))


def _validation_views(name: str, clean: np.ndarray, voxel_size: tuple[float, float, float], config: TrainConfig,
                      *, plain: int, plain_seed: int, randomised: int, randomised_seed: int) -> list[ValidationCase]:
    """``plain`` physical views of a validation volume, then ``randomised`` views of it whose
    content is randomised first (``TrainConfig.validation_randomised_views``); the names group
    every view with its volume (``calibration.volume_of``)."""
    simulator = config.validation_simulator or config.simulator
    cases = [_simulated_validation(f"{name} (simulated, seed {plain_seed + k})", clean, voxel_size, simulator,
                                   plain_seed + k) for k in range(plain)]
    for k in range(randomised):
        rng = np.random.default_rng(randomised_seed + k)
        target = randomise_content(clean, voxel_size, config.simulator, rng)
        cases.append(_simulated_validation(f"{name} (randomised content, seed {randomised_seed + k})", target,
                                           voxel_size, simulator, rng))
    return cases


def build_data(config: TrainConfig, *, validation_only: bool = False
               ) -> tuple[list[PatchSource], list[ValidationCase]]:
    """Training sources and validation cases from every data source the config names.

    ``validation_only`` (gate recalibration) builds no training source: each would cost a pass
    over its volume. Raises ``InputError`` naming the file or folder before any training starts.
    """
    sources: list[PatchSource] = []
    validation: list[ValidationCase] = []
    settings = config.patch_settings()
    validation_simulator = config.validation_simulator or config.simulator
    if config.fmc_dir:
        pairs = discover_fmc_pairs(config.fmc_dir, channel=config.channel)
        train, held = split_by_study(pairs, config.validation_studies)
        for p in [] if validation_only else train:
            sources.append(RealPairs(p.angle.path.name, PairPatches(
                open_volume(p.angle.path, info=p.angle, memmap=True),
                open_volume(p.fused.path, info=p.fused, memmap=True), settings)))
        for p in held:
            validation.append(ValidationCase(p.angle.path.name,
                                             _validation_crop(p.angle), _validation_crop(p.fused)))
    clean_paths = (list_cases(config.clean_dir) if config.clean_dir else []) + [
        Path(f) for f in config.clean_files]
    if clean_paths:
        infos = [inspect_case(path) for path in clean_paths]  # headers first: read only the chosen
        chosen_infos = [c for c in infos if c.meta.channel == config.channel]
        if not chosen_infos:
            raise InputError(f"no clean volume of channel {config.channel!r} among {len(infos)} clean "
                             f"file(s) (channels found: {sorted({c.meta.channel for c in infos})})")
        for c in infos:
            if c.meta.channel != config.channel:
                log.info("clean volume %s is %s, not %s: skipped", c.path.name, c.meta.channel, config.channel)
        chosen = [read_case(c.path, info=c) for c in chosen_infos]
        for case in chosen:
            check_clean_volume(case.path.name, case.volume)
        for i, case in enumerate(chosen):
            clean = case.volume.astype(np.float32)
            if not validation_only:
                sources.append(SimulatedPairs(case.path.name, clean, case.meta.voxel_size.zyx, config))
            if config.validate_on_training_volumes:
                validation += _validation_views(case.path.name, clean, case.meta.voxel_size.zyx, config,
                                                plain=1, plain_seed=10_000 + i, randomised=0, randomised_seed=0)
    for i, path in enumerate(Path(f) for f in config.validation_files):
        case = read_case(path)
        check_clean_volume(path.name, case.volume)
        validation += _validation_views(path.name, case.volume.astype(np.float32), case.meta.voxel_size.zyx,
                                        config, plain=config.validation_views, plain_seed=10_000 + 100 * (i + 1),
                                        randomised=config.validation_randomised_views,
                                        randomised_seed=50_000 + 100 * (i + 1))
    for i in range(0 if validation_only else config.phantoms):
        clean = _phantom(config.channel, config.phantom_shape, config.seed * 100_003 + i)
        sources.append(SimulatedPairs(f"phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX, config))
    for i in range(config.validation_phantoms if (config.phantoms or clean_paths) else 0):
        seed = 1_000_000_007 + i  # never a training phantom's seed
        clean = _phantom(config.channel, config.phantom_shape, seed)
        validation.append(_simulated_validation(f"validation phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX,
                                                validation_simulator, seed))
        validation += _validation_views(f"validation phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX, config, plain=0,
                                        plain_seed=0, randomised=config.validation_randomised_views,
                                        randomised_seed=60_000 + 100 * i)
    if validation_only and not validation:
        raise InputError("no validation case in the config: name validation studies, clean volumes or phantoms")
    if not sources and not validation_only:
        raise InputError("no training source could be built from the config")
    return sources, validation


def draw_batch(sources: Sequence[PatchSource], batch_size: int, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (input, target) patches, each from a source drawn uniformly."""
    pairs = [sources[int(rng.integers(len(sources)))].sample(rng) for _ in range(batch_size)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    return x, y


# --------------------------------------------------------------------------- losses


def ssim_torch(a: torch.Tensor, b: torch.Tensor, win: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable mean 3-D SSIM with a uniform window (valid region, as skimage crops)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win**3
    pool = lambda t: F.avg_pool3d(t, win, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    cov = n / (n - 1)
    var_a = cov * (pool(a * a) - mu_a * mu_a)
    var_b = cov * (pool(b * b) - mu_b * mu_b)
    cov_ab = cov * (pool(a * b) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def training_loss(output: torch.Tensor, target: torch.Tensor, *, loss: str, ssim_weight: float = 0.0
                  ) -> torch.Tensor:
    """MAE, MSE or Laplace negative log-likelihood (location, scale), plus (1 - SSIM) if weighted."""
    location = output[:, :1]
    if loss == "mae":
        value = (location - target).abs().mean()
    elif loss == "mse":
        value = ((location - target) ** 2).mean()
    elif loss == "laplace":
        scale = output[:, 1:2]
        value = (torch.log(2 * scale) + (location - target).abs() / scale).mean()
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if ssim_weight:
        value = value + ssim_weight * (1 - ssim_torch(location, target))
    return value


# --------------------------------------------------------------------------- one member


def _is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and this rank's device; starts the process group under torchrun.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` (not the global rank modulo the
    GPU count, which is wrong on several nodes), and sets it current *before* the NCCL group
    starts, so NCCL and the object collectives use that GPU rather than all piling onto GPU 0.
    """
    if not _is_distributed():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier() -> None:
    """Wait for every rank (nothing outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Every rank arrives, then the process group ends cleanly (nothing outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The mean of ``value`` over ranks (the logged loss is every rank's, not rank 0's)."""
    if world == 1:
        return value
    shared = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(shared)
    return float(shared) / world


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


def predict_normalised(volume: np.ndarray, predict_block: Callable[[np.ndarray], np.ndarray], *,
                       margin: int, align: int) -> np.ndarray:
    """A whole volume predicted on the challenge's normalised scale (tiled, exact stitching)."""
    norm = PercentileNorm.fit(volume)
    return predict_tiled(volume, predict_block, tile=DEFAULT_TILE["cpu"], margin=margin, align=align,
                         transform=norm.forward)  # type: ignore[return-value]


def _predict_volume(model: CareUNet, volume: np.ndarray, device: torch.device) -> np.ndarray:
    """One member's normalised prediction of a validation volume."""
    config = model.config

    @torch.inference_mode()
    def predict(block: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(block)[None, None].to(device))[0, 0].float().cpu().numpy()

    return predict_normalised(volume, predict, margin=config.tiling_margin, align=config.alignment)


def validate(model: CareUNet, patches: tuple[torch.Tensor, torch.Tensor], cases: Sequence[ValidationCase],
             config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation loss and MAE on fixed patches, and N-SSIM per validation volume."""
    model.eval()
    with torch.inference_mode():
        x, y = patches[0].to(device), patches[1].to(device)
        out = model(x)
        result = {"val_loss": float(training_loss(out, y, loss=config.loss, ssim_weight=config.ssim_weight)),
                  "val_mae": float((out[:, :1] - y).abs().mean())}
    scores = [score_ssim(c.target, _predict_volume(model, c.source, device), c.source).n_ssim for c in cases]
    if scores:
        result.update(val_nssim_mean=float(np.mean(scores)), val_nssim_min=float(np.min(scores)))
    model.train()
    return result


CHECKPOINT_BEST, CHECKPOINT_LAST, LOG_NAME = "best.pt", "last.pt", "log.csv"


@dataclass(frozen=True)
class MemberResult:
    run_dir: Path
    best: dict[str, float]
    steps: int
    seconds: float


def _score(metrics: dict[str, float]) -> float:
    """Higher is better: mean validation N-SSIM where there is any, else minus the loss."""
    return metrics.get("val_nssim_mean", -metrics["val_loss"])


def train_member(config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True, data: tuple[list[PatchSource], list[ValidationCase]] | None = None
                 ) -> MemberResult:
    """Train one member into ``run_dir`` (config.json, best.pt, last.pt, log.csv)."""
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    rank, world, device = _setup_distributed(device)
    sources, cases = data if data is not None else build_data(config)
    rng = np.random.default_rng([config.seed, rank])
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = CareUNet(config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=config.lr_patience)
    val_patches = draw_batch(sources, config.validation_patches, np.random.default_rng([config.seed, 99]))
    start_step, best_score, best = 0, -np.inf, {}
    last_path = run_dir / CHECKPOINT_LAST
    state = _resume_state(last_path, rank, world) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, best_score, best = state["step"], state["best_score"], state["best"]
        rng = _rank_rng(config, rank, state["rng"], start_step)
        saved_world = len(state["rng"])
        log.info("resumed %s at step %d%s", run_dir, start_step,
                 f" ({saved_world} rank(s) saved, {world} now)" if saved_world != world else "")
    elif config.init_weights:
        model.load_state_dict(_initial_state(config))
        log.info("%s starts from the weights of %s", run_dir, config.init_weights)
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
        loss = _mean_over_ranks(loss, device, world)
        states = [rng.bit_generator.state]
        if world > 1:  # every rank's patch stream goes into last.pt, in rank order
            states = [None] * world
            dist.all_gather_object(states, rng.bit_generator.state)
        metrics = validate(model, val_patches, cases, config, device) if rank == 0 else {"val_loss": 0.0}
        if world > 1:  # every rank steps its scheduler alike
            shared = torch.tensor([metrics["val_loss"]], device=device)
            dist.broadcast(shared, 0)
            metrics["val_loss"] = float(shared)
        if done > 0:
            scheduler.step(metrics["val_loss"])
        if rank == 0:
            save(done, loss, metrics, states)
        _barrier()  # no rank runs ahead of (or exits before) a checkpoint that is being written

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
                    "best": best, "rng": states}, last_path)

    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc=f"train {run_dir.name}", disable=not progress or rank != 0, unit="step")
    if start_step == 0:
        checkpoint(0, float("nan"))  # the untrained baseline: step 0 of the log
    model.train()
    for step in bar:
        x, y = draw_batch(sources, config.batch_size, rng)
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


def _member_init(init_weights: str, k: int) -> str:
    """Member k's starting weights: ``init_weights/member_<k mod n>`` when it names an ensemble."""
    folder = Path(init_weights)
    members = sorted(folder.glob("member_*")) if init_weights and folder.is_dir() else []
    return str(members[k % len(members)]) if members else init_weights


def _initial_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of ``config.init_weights`` (a member folder), checked against ``config.model``."""
    folder = Path(config.init_weights)
    weights = folder / "weights.pt" if folder.is_dir() else folder
    if not weights.is_file():
        raise InputError(f"init_weights {config.init_weights}: no weights.pt there")
    member_config = folder / "config.json" if folder.is_dir() else weights.with_name("config.json")
    if member_config.is_file():
        saved = ModelConfig.load(member_config)
        if saved != config.model:
            raise ConfigError(f"init_weights {config.init_weights}: its model {saved.to_dict()} differs "
                              f"from the config's {config.model.to_dict()}")
    return torch.load(weights, map_location="cpu", weights_only=True)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    fields = ["step", "loss", "lr", "seconds", "val_loss", "val_mae", "val_nssim_mean", "val_nssim_min"]
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _finite_numbers(values: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in values.values() if isinstance(v, (int, float)))


def check_trained(run_dir: Path, best: dict[str, Any], *, warm_started: bool = False) -> None:
    """``TrainingError`` unless a run's best checkpoint is trained (step > 0, or step 0 of a warm
    start) with finite metrics.

    Step 0 of a random start is the untrained network, which validation can prefer when training
    never improved on it (too few steps, a diverged loss); exporting it would ship random weights.
    Step 0 of a warm start is the network it started from, already trained.
    """
    if not best or not (run_dir / CHECKPOINT_BEST).is_file():
        raise TrainingError(f"{run_dir}: no best checkpoint (every validation was NaN?): nothing to export")
    if int(best.get("step", 0)) <= 0 and not warm_started:
        raise TrainingError(f"{run_dir}: the best checkpoint is step 0, the untrained network (training never "
                            "improved on it: more steps, another learning rate?); not exported")
    # step 0 has no training loss yet (NaN by design); everything measured must be finite
    measured = {k: v for k, v in best.items() if k != "loss" or int(best.get("step", 0)) > 0}
    if not _finite_numbers(measured):
        raise TrainingError(f"{run_dir}: the best checkpoint (step {best.get('step')}) has non-finite metrics "
                            f"{ {k: v for k, v in best.items() if isinstance(v, float)} }; not exported")


def export_member(run_dir: Path, member_dir: Path, config: TrainConfig) -> None:
    """Best checkpoint of a run -> ``member_dir`` (config.json, weights.pt, training.json).

    ``TrainingError`` (see ``check_trained``) for an untrained or non-finite best checkpoint.
    """
    if not (run_dir / CHECKPOINT_BEST).is_file():
        raise TrainingError(f"{run_dir}: no {CHECKPOINT_BEST}: nothing to export")
    state = torch.load(run_dir / CHECKPOINT_BEST, map_location="cpu", weights_only=False)
    check_trained(run_dir, {**state.get("metrics", {}), "step": state.get("step", 0)},
                  warm_started=bool(config.init_weights))
    model = CareUNet(config.model)
    model.load_state_dict(state["model"])
    save_member(member_dir, model, extra_files={"training.json": {"config": config.to_dict(),
                                                                   "best": _strict(state["metrics"])}})


def check_ensemble_target(folder: Path, *, overwrite: bool) -> None:
    """``TrainingError`` when ``folder`` holds anything and ``overwrite`` is off.

    Checked before any data is read, so a run is refused in seconds, not after hours of
    training; the shipped ``model_weights/<channel>/`` is never replaced by accident.
    """
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise TrainingError(f"{folder} already holds an ensemble (or other files): refusing to write into it; "
                            "pass --overwrite to replace it, or choose a new --weights folder")


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as None, so that it can be written as strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete ensemble in ``staging`` in place of ``folder`` (whatever it held)."""
    old = folder.with_name(f".{folder.name}.replaced-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def train_ensemble(config: TrainConfig, *, runs_dir: str | Path, weights_dir: str | Path, members: int = 1,
                   resume: bool = False, progress: bool = True, overwrite: bool = False,
                   calibrate: bool = True) -> list[MemberResult]:
    """Train ``members`` members (seeds seed, seed+1, ...) and write ``weights_dir/<channel>/``.

    The ensemble is assembled in a hidden staging folder beside the target and swapped in only
    when complete (every member of this run exported, manifest and gate written), so the target
    never mixes members of two runs nor holds half an ensemble. A non-empty target is refused
    unless ``overwrite`` (then it is replaced as a whole, stale ``member_*`` included); an
    untrained or non-finite member stops the run before anything is written (``check_trained``).
    ``calibrate=False`` skips the gate's calibration (training in phases calibrates once, at the end).
    """
    runs_dir, weights_dir = Path(runs_dir), Path(weights_dir)
    if members < 1:
        raise ConfigError(f"--members must be >= 1, got {members}")
    folder = weights_dir / config.channel
    check_ensemble_target(folder, overwrite=overwrite)
    writer = int(os.environ.get("RANK", "0")) == 0  # the process group starts in train_member
    data = build_data(config)
    staging = weights_dir / f".{config.channel}.staging-{os.getpid()}"
    results = []
    try:
        for k in range(members):
            member_config = config.replace(seed=config.seed + k,
                                           init_weights=_member_init(config.init_weights, k))
            result = train_member(member_config, runs_dir / f"member_{k}", resume=resume, progress=progress,
                                  data=data)
            results.append(result)
            _barrier()  # every rank finished this member before rank 0 reads its checkpoints
            if writer:
                check_trained(result.run_dir, result.best, warm_started=bool(member_config.init_weights))
                export_member(result.run_dir, staging / f"member_{k}", member_config)
            _barrier()  # and the export is complete before anyone goes on
        if writer:
            info = _strict({"members": members, "best": [r.best for r in results]})
            write_manifest(staging, config.channel, info=info)
            _, validation = data
            if validation and calibrate:
                recalibrate_gate(staging, validation, device=config.device, info=info, progress=progress)
            check_ensemble_target(folder, overwrite=overwrite)  # nothing appeared there meanwhile
            _swap_in(staging, folder)
            log.info("wrote the %d-member %s ensemble to %s", members, config.channel, folder)
    finally:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
    shutdown_distributed()  # after rank 0 wrote the ensemble; then every rank's group ends cleanly
    return results


def recalibrate_gate(folder: Path, validation: Sequence[ValidationCase], *, device: str = "cpu",
                     info: dict[str, Any] | None = None, progress: bool = False) -> GateConfig:
    """Calibrate an ensemble's gate and rewrite its manifest with the gate and the whole table.

    ``WeightsError`` when ``folder`` holds no ensemble (no readable manifest).
    """
    if not (folder / MANIFEST).is_file():
        raise WeightsError(f"no ensemble to calibrate in {folder} (no {MANIFEST}); train one first")
    manifest = read_manifest(folder)
    if info is None:
        info = manifest.get("info", {})
    gate, table = calibrate_ensemble_gate(folder, validation, device=device, progress=progress)
    names = [v.name for v in validation]
    cv = cross_validate(names, table)
    if cv is not None:
        log.info("leave-one-volume-out N-SSIM of the choice rule: mean %.4f, worst %.4f", cv.mean, cv.worst)
    write_manifest(folder, str(manifest.get("channel", folder.name)), gate=gate, info=_strict({
        **info, "gate_cases": names, "gate_calibration": [c.to_dict() for c in table],
        "gate_cross_validation": None if cv is None else [
            {"held_out": held, "gate": g.to_dict(), "n_ssim": list(scores)} for held, g, scores in cv.folds]}))
    return gate


def predict_ensemble_volume(ensemble: Ensemble, volume: np.ndarray) -> np.ndarray:
    """Normalised (2, Z, Y, X) mean and spread of an ensemble over a whole volume."""
    return predict_normalised(volume, ensemble.predict_block, margin=ensemble.margin, align=ensemble.alignment)


def calibrate_ensemble_gate(folder: Path, cases: Sequence[ValidationCase], *, device: str = "cpu",
                            progress: bool = False) -> tuple[GateConfig, list[GateCandidate]]:
    """Calibrate the do-no-harm gate of a saved ensemble on validation volumes; logs the table."""
    ensemble = load_ensemble(folder, device=device)
    predictions = [predict_validation(c.name, c.source, c.target,
                                      lambda v: predict_ensemble_volume(ensemble, v)) for c in cases]
    gate, table = calibrate_gate(predictions, progress=progress)
    ungated = table[0]
    chosen = next(c for c in table if c.gate == gate)
    log.info("validation N-SSIM ungated: mean %.4f, worst %.4f; gated %s: mean %.4f, worst %.4f",
             ungated.mean, ungated.worst, gate.to_dict(), chosen.mean, chosen.worst)
    return gate, table

"""What a ``TrainConfig`` names, built into patch sources to train on and whole volumes to validate on.

Training draws random patches from sources (real FMC pairs, or single views simulated afresh from
clean volumes and phantoms); validation scores whole, centre-cropped volumes that were never
trained on, plus, optionally, views of the training volumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fusecare.constants import NUCLEUS
from fusecare.errors import InputError
from fusecare.io import CaseInfo, inspect_case, list_cases, open_volume, opened_volume, read_case
from fusecare.normalize import PercentileNorm
from fusecare.restoration.attenuation import AttenuationField, view_field
from fusecare.training.config import TrainConfig
from fusecare.training.pairs import PairPatches, check_clean_volume, discover_fmc_pairs, split_by_study
from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom, nuclei_phantom
from fusecare.training.simulate import SimulatorConfig, randomise_content, simulate_pair, zoom_content

log = logging.getLogger(__name__)

VALIDATION_CROP = (64, 256, 256)
"""Validation volumes are centre-cropped to this, so a validation pass stays short."""


class PatchSource(Protocol):
    name: str
    synthetic: bool
    """A phantom (``TrainConfig.phantom_share`` sets how often such sources are drawn)."""

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class RealPairs:
    """Patches of one real (input, target) pair, read lazily from memory maps."""

    name: str
    patches: PairPatches
    synthetic: bool = False

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.patches.sample(rng)


class SimulatedPairs:
    """Patches of single views simulated from one clean volume, re-simulated every N draws."""

    def __init__(self, name: str, clean: np.ndarray, voxel_size: tuple[float, float, float],
                 config: TrainConfig, *, synthetic: bool = False) -> None:
        self.name, self.clean, self.voxel_size, self.config = name, clean, voxel_size, config
        self.synthetic = synthetic
        self._patches: PairPatches | None = None
        self._draws = 0

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self._patches is None or self._draws % self.config.resimulate_every == 0:
            simulator = self.config.simulator
            clean = zoom_content(self.clean, simulator, rng, minimum_shape=self.config.patch)
            clean = (randomise_content(clean, self.voxel_size, simulator, rng)
                     if simulator.randomises_content else clean)
            view, target, _ = simulate_pair(clean, self.voxel_size, config=simulator, seed=rng)
            field = view_field(view, self.voxel_size) if self.config.model.corrected_input else None
            self._patches = PairPatches(view, target, self.config.patch_settings(), field)
        self._draws += 1
        return self._patches.sample(rng)


@dataclass(frozen=True)
class ValidationCase:
    """A whole (input, target) volume pair scored with N-SSIM during training."""

    name: str
    source: np.ndarray
    target: np.ndarray
    synthetic: bool = False
    """Simulated from a phantom, not from a real volume (``validation_score`` weighs the two)."""
    voxel_size_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Physical voxel size (um): the attenuation correction smooths in um."""
    member_input: np.ndarray | None = None
    """What members with ``ModelConfig.corrected_input`` read: the challenge-normalised ``source``
    times its attenuation field (``with_member_input``); None for members that read the view."""
    attenuation: AttenuationField | None = None
    """The view's attenuation estimate (``with_field``), for members that read the corrected view
    (calibration feeds it to them, ``CorrectedView``, instead of estimating it again) or a
    ``TrainConfig.validation_gate`` that corrects attenuation."""

    @property
    def field(self) -> np.ndarray | None:
        """``attenuation`` over the whole case (interpolated from its coarse grid when asked): a
        gated validation divides the prediction of members that read the corrected view by it
        before the gate, as inference does, and the gate multiplies it back."""
        return None if self.attenuation is None else self.attenuation.full()


def with_field(case: ValidationCase) -> ValidationCase:
    """``case`` with the attenuation ``field`` estimated on its view, as inference would estimate it
    given the case (a validation case may be a centre crop, ``VALIDATION_CROP``; calibration and
    the benchmark estimate on the same case). Training patches carry the field of their whole
    simulated view, so on a cropped case the two differ by what the crop leaves out."""
    return replace(case, attenuation=view_field(case.source, case.voxel_size_zyx))


def with_member_input(case: ValidationCase) -> ValidationCase:
    """``case`` with its ``field`` (``with_field``) and its ``member_input``, the normalised view
    times that field."""
    case = case if case.attenuation is not None else with_field(case)
    return replace(case, member_input=PercentileNorm.fit(case.source).forward(case.source) * case.field)


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
                          simulator: SimulatorConfig, seed: int | np.random.Generator, *,
                          synthetic: bool = False) -> ValidationCase:
    """A validation case named ``name``: one (single view, target) pair simulated from a whole
    clean volume (``simulate_pair``), both centre-cropped to ``VALIDATION_CROP``."""
    view, target, _ = simulate_pair(clean, voxel_size, config=simulator, seed=seed)
    return ValidationCase(name, _centre_crop(view, VALIDATION_CROP), _centre_crop(target, VALIDATION_CROP),
                          synthetic, tuple(float(v) for v in voxel_size))  # type: ignore[arg-type]


def _validation_views(name: str, clean: np.ndarray, voxel_size: tuple[float, float, float], config: TrainConfig,
                      *, plain: int, plain_seed: int, randomised: int, randomised_seed: int,
                      synthetic: bool = False) -> list[ValidationCase]:
    """``plain`` physical views of a validation volume, then ``randomised`` views of it whose
    content is randomised first (``TrainConfig.validation_randomised_views``); the names group
    every view with its volume (``volume_of``)."""
    simulator = config.validation_simulator or config.simulator
    cases = [_simulated_validation(f"{name} (simulated, seed {plain_seed + k})", clean, voxel_size, simulator,
                                   plain_seed + k, synthetic=synthetic) for k in range(plain)]
    for k in range(randomised):
        rng = np.random.default_rng(randomised_seed + k)
        target = randomise_content(clean, voxel_size, config.simulator, rng)
        cases.append(_simulated_validation(f"{name} (randomised content, seed {randomised_seed + k})", target,
                                           voxel_size, simulator, rng, synthetic=synthetic))
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
        log.info("%s: %d %s pair(s), %d for training and %d for validation (studies %s)", config.fmc_dir,
                 len(pairs), config.channel, len(train), len(held), sorted(set(config.validation_studies)) or "none")
        for p in [] if validation_only else train:
            view = open_volume(p.angle.path, info=p.angle, memmap=True)
            field = view_field(view, p.angle.meta.voxel_size.zyx) if config.model.corrected_input else None
            sources.append(RealPairs(p.angle.path.name, PairPatches(
                view, open_volume(p.fused.path, info=p.fused, memmap=True), settings, field)))
        for p in held:
            validation.append(ValidationCase(p.angle.path.name, _validation_crop(p.angle), _validation_crop(p.fused),
                                             voxel_size_zyx=p.angle.meta.voxel_size.zyx))
    clean_paths = (list_cases(config.clean_dir) if config.clean_dir else []) + [
        Path(f) for f in config.clean_files]
    if clean_paths:
        infos = [inspect_case(path) for path in clean_paths]  # headers first: read only the chosen
        wanted = config.content_channels or (config.channel,)
        chosen_infos = [c for c in infos if c.meta.channel in wanted]
        if not chosen_infos:
            raise InputError(f"no clean volume of channel {' or '.join(map(repr, wanted))} among {len(infos)} "
                             f"clean file(s) (channels found: {sorted({c.meta.channel for c in infos})}); "
                             f"config field 'content_channels' names others")
        for c in infos:
            if c.meta.channel not in wanted:
                log.info("clean volume %s is %s, not %s: skipped", c.path.name, c.meta.channel, " or ".join(wanted))
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
        sources.append(SimulatedPairs(f"phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX, config, synthetic=True))
    for i in range(config.validation_phantoms if (config.phantoms or clean_paths) else 0):
        seed = 1_000_000_007 + i  # never a training phantom's seed
        clean = _phantom(config.channel, config.phantom_shape, seed)
        validation.append(_simulated_validation(f"validation phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX,
                                                validation_simulator, seed, synthetic=True))
        validation += _validation_views(f"validation phantom {i}", clean, PHANTOM_VOXEL_SIZE_ZYX, config, plain=0,
                                        plain_seed=0, randomised=config.validation_randomised_views,
                                        randomised_seed=60_000 + 100 * i, synthetic=True)
    if validation_only and not validation:
        raise InputError("no validation case in the config: name validation studies, clean volumes or phantoms")
    if not sources and not validation_only:
        raise InputError("no training source could be built from the config")
    if config.model.corrected_input:
        validation = [with_member_input(case) for case in validation]
    elif config.validation_gate is not None and config.validation_gate.correct_attenuation:
        validation = [with_field(case) for case in validation]  # estimated once, not at every validation
    return sources, validation


def source_probabilities(sources: Sequence[PatchSource], phantom_share: float | None) -> np.ndarray | None:
    """How often each source is drawn: ``phantom_share`` spread evenly over the phantoms and the rest
    evenly over the real content (``None`` = every source alike). When one group is empty the other
    gets every draw."""
    if phantom_share is None:
        return None
    synthetic = np.array([s.synthetic for s in sources], dtype=bool)
    n_synthetic, n_real = int(synthetic.sum()), int((~synthetic).sum())
    if n_synthetic == 0 or n_real == 0:
        log.info("phantom_share %.2f has no %s to weigh against: every source drawn alike", phantom_share,
                 "phantom" if n_synthetic == 0 else "real content")
        return None
    return np.where(synthetic, phantom_share / n_synthetic, (1.0 - phantom_share) / n_real)


def draw_batch(sources: Sequence[PatchSource], batch_size: int, rng: np.random.Generator,
               probabilities: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (input, target) patches, each from a source drawn uniformly or with
    ``probabilities`` (``source_probabilities``)."""
    def pick() -> int:  # the uniform draw keeps its random stream (resumed runs, old seeds)
        if probabilities is None:
            return int(rng.integers(len(sources)))
        return int(rng.choice(len(sources), p=probabilities))

    pairs = [sources[pick()].sample(rng) for _ in range(batch_size)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
    return x, y



def volume_of(case_name: str) -> str:
    """The volume a validation case was simulated from: its name before `` (`` (views are named
    ``<file> (simulated, seed N)`` or ``<file> (randomised content, seed N)``; each phantom is a
    volume of its own)."""
    return case_name.split(" (", 1)[0]


def validation_score(cases: Sequence[ValidationCase], n_ssim: Sequence[float], phantom_share: float | None
                     ) -> float:
    """The number training's checkpoint choice maximises: the mean N-SSIM of the validation cases,
    or, with ``phantom_share``, the phantoms' and the real volumes' per-volume means weighed as
    training draws them (``source_probabilities``), so several views of the phantoms do not
    outvote the one real volume. When one group is empty the other decides alone."""
    if phantom_share is None:
        return float(np.mean(n_ssim))
    groups: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    for case, score in zip(cases, n_ssim):
        groups[case.synthetic].setdefault(volume_of(case.name), []).append(score)
    means = {synthetic: float(np.mean([np.mean(v) for v in volumes.values()]))
             for synthetic, volumes in groups.items() if volumes}
    if len(means) < 2:
        return next(iter(means.values()))
    return phantom_share * means[True] + (1.0 - phantom_share) * means[False]

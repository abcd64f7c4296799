"""One training run described by one ``TrainConfig``: validated, saved as ``config.json`` in the
run folder and as ``training.json`` beside each member's weights, so every ensemble says what made it."""

from __future__ import annotations

from fusecare.config import Config, param
from fusecare.constants import CHANNELS, NUCLEUS
from fusecare.errors import ConfigError
from fusecare.restoration.gate import GateConfig
from fusecare.restoration.model import ModelConfig
from fusecare.training.pairs import PatchSettings
from fusecare.training.simulate import SimulatorConfig

LOSSES = ("mae", "mse", "laplace")
"""Pixel losses ``training.losses.training_loss`` knows (laplace needs a probabilistic model)."""


class TrainConfig(Config):
    """Everything one training run needs; saved beside what it produced."""

    channel: str = param(NUCLEUS, doc="Which ensemble this trains.", choices=CHANNELS)
    model: ModelConfig = param(ModelConfig(), doc="Network of each member (see ModelConfig).")
    fmc_dir: str = param("", doc="Folder of FMC pairs image_<id>_<channel>_angle/fused.tif ('' = none).")
    validation_studies: tuple[int, ...] = param((), doc="FMC studies held out for validation.", ge=0)
    clean_dir: str = param("", doc="Folder of clean volumes to simulate single views from ('' = none).")
    clean_files: tuple[str, ...] = param((), doc="Clean volume files, beside or instead of clean_dir.")
    content_channels: tuple[str, ...] = param(
        (), doc="Channels whose clean volumes (clean_dir, clean_files) this run simulates from; empty = "
        "the run's own channel. What the nets learn (undo one view's attenuation, blur and noise) is shared "
        "by both channels, and one channel's real content may be too scarce to generalise from: a nucleus "
        "ensemble may learn from membrane volumes.", choices=CHANNELS)
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
    validation_gate: GateConfig | None = param(
        None, doc="Safety net each member's validation prediction goes through before it is scored, as "
        "inference would run it (one member: no spread), so that checkpoints are chosen on what ships "
        "(null = scored ungated). A net whose raw prediction loses on unseen content may still win "
        "under the gate (half its correction, say): the ungated score would keep its start. Its spread "
        "terms do nothing here (one member), and members that read the corrected view always get the "
        "field back, as at inference. It must use the prediction (blend > 0).")
    init_weights: str = param("", doc="Weights that start training instead of a random initialisation: "
                              "a member folder (config.json + weights.pt), or an ensemble folder whose "
                              "member_<k> starts member k ('' = random). Not read when resuming.")
    init_zero_head: bool = param(False, doc="Zero the head of ``init_weights``: training starts exactly at the "
                                 "residual's base (the input, or the Gaussian of ``model.base_sigma``) with the "
                                 "initial weights' features. Their ``base_sigma`` may then differ from the model's. "
                                 "Step 0 may stay a member's best: if no step beats the base on validation, the "
                                 "member ships as the base itself.")
    phantoms: int = param(0, doc="Synthetic clean phantoms of this channel added to the content.",
                          ge=0, le=10_000)
    phantom_share: float | None = param(
        None, doc="Share of training patches drawn from the phantoms, the rest spread evenly over the real "
        "content (null = every source alike, so 8 phantoms beside 2 real volumes give the phantoms 80%: "
        "nets then learn the phantoms' look and gain little on real content they never saw).",
        ge=0.0, le=1.0)
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
        if self.validation_gate is not None and not self.validation_gate.needs_prediction:
            raise ConfigError("config field 'validation_gate' ignores the prediction (blend 0): every checkpoint "
                              "would score the same; set a blend above 0 or leave it null")
        if self.init_zero_head and not self.init_weights:
            raise ConfigError("config field 'init_zero_head' zeroes the head of init_weights: set init_weights")
        align = self.model.alignment
        if any(p % align for p in self.patch):
            raise ConfigError(f"config field 'patch' {list(self.patch)} must be multiples of {align} "
                              f"(2**model.depth)")

    def patch_settings(self) -> PatchSettings:
        return PatchSettings(patch=self.patch, foreground_fraction=self.foreground_fraction,
                               pmin=self.pmin, pmax=self.pmax,
                               normalize_per_patch=self.normalize_per_patch)

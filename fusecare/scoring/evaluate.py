"""Score predictions the way the Fuse My Cells leaderboard does: N-SSIM and N-IoU per case.

``evaluate_folder`` pairs the cases of a prediction, a target and an input folder by file name,
scores each and returns one ``ScoredCase`` per case; a case that cannot be scored (missing
partner, shapes that differ, unreadable file) gets its one-line reason and the others are
still scored. ``score_volumes`` scores volumes already opened; its N-SSIM is
``metrics.score_ssim``, which training's validation and the benchmarks call, so they report the
very same numbers as ``evaluation/score.py``. Each volume is histogrammed once per case
(``fit_norms``): the scores and the picture share the fitted normalisations.

Numbers it cannot stand behind are never reported: a volume with NaN/Inf voxels is a failed
case with its reason (the challenge's normalisation and SSIM are undefined on it), and a case
whose target equals its input (SSIM(input, target) = 1, so N-SSIM is -inf or NaN: typically
``--pred`` and ``--gt`` swapped) or whose N-IoU is undefined is scored but ``excluded`` from the
means, with a named warning and the reason in the report.

Pairing: names are compared without their ``.tif``/``.tiff`` suffix and without a trailing
``_angle`` or ``_fused`` (the challenge's input and target names), case-insensitively. The
channel comes from the input's metadata (``nucleus``, anything else membrane), else the
target's, else the file name; ``EvalOptions.channel`` overrides it. Voxel sizes come from the
target (the metadata of some challenge inputs disagree with their target's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from fusecare.config import Config
from fusecare.errors import ConfigError, FuseCareError, InputError
from fusecare.io import CHANNELS, TIFF_SUFFIXES, CaseInfo, Volume, inspect_case, opened_volume, tiff_files
from fusecare.normalize import PercentileNorm, percentiles, z_slabs
from fusecare.scoring.metrics import SsimScores, Window, score_ssim
from fusecare.scoring.segment import SegmenterCache, SegOptions, SegScores, score_segmentation

log = logging.getLogger(__name__)

CASE_ROLES = ("pred", "target", "input")
_ROLE_NAMES = {"pred": "prediction", "target": "target", "input": "input"}
_KEY_SUFFIX = re.compile(r"_(angle|fused)$", re.IGNORECASE)


class SsimOptions(Config):
    """The unpublished SSIM choices; defaults: 3-D, 7-voxel uniform window, data_range 1."""

    window: Window = "uniform"
    per_slice: bool = False
    data_range: float | Literal["target"] = 1.0
    """A number, or "target": max - min of the normalised target."""
    win_size: int | None = None
    sigma: float = 1.5


class EvalOptions(Config):
    """Everything ``evaluate_folder`` and ``score_volumes`` can be told."""

    ssim: SsimOptions = SsimOptions()
    segment: bool = True
    seg: SegOptions = SegOptions()
    channel: str | None = None
    """Force every case to this channel (``nucleus`` or ``membrane``)."""
    device: str = "auto"
    """SSIM and cellpose device: auto (CUDA when present), cpu, cuda, cuda:N."""
    cellpose_models: Mapping[str, str | Path] = field(default_factory=dict)
    """Channel (or "*") -> cellpose model path; default the built-in nuclei / cyto3."""
    allow_download: bool = True
    png_dir: Path | None = None
    uncertainty_dir: Path | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.channel is not None and self.channel not in CHANNELS:
            raise ConfigError(f"channel must be one of {CHANNELS}, got {self.channel!r}")

    def settings(self) -> dict[str, Any]:
        """The choices that change the numbers, for the report."""
        out: dict[str, Any] = {"ssim": asdict(self.ssim), "segment": self.segment,
                               "channel_override": self.channel}
        if self.segment:
            out["iou"] = asdict(self.seg)
            out["cellpose_models"] = {ch: str(SegmenterCache(self.cellpose_models).model_for(ch)) for ch in CHANNELS}
        return out


@dataclass(frozen=True)
class CasePaths:
    """One case's files; ``problem`` says why it cannot be scored (then some path may be None)."""

    name: str
    pred: Path | None
    target: Path | None
    input: Path | None
    problem: str | None = None


@dataclass
class ScoredCase:
    """The scores of one case, or the reason it has none."""

    case: str
    channel: str | None = None
    study: int | None = None
    ssim: SsimScores | None = None
    seg: SegScores | None = None
    seconds: float = 0.0
    error: str | None = None
    png: Path | None = None
    excluded: str | None = None
    """Why this scored case is left out of the means (its scores are undefined), or None."""
    picture: Any = None
    """``figures.CasePicture`` between scoring and drawing (drawn once the whole run is scored)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def counted(self) -> bool:
        """Scored and counted in the means."""
        return self.ok and self.excluded is None


# --------------------------------------------------------------------------- pairing


def case_key(name: str) -> str:
    """Pairing key: lower case, no TIFF suffix, no trailing ``_angle``/``_fused``."""
    stem = name
    for suffix in TIFF_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return _KEY_SUFFIX.sub("", stem).lower()


def _tiffs(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in tiff_files(folder, kind="folder"):
        found.setdefault(case_key(path.name), []).append(path)
    return found


def pair_cases(pred_dir: str | Path, target_dir: str | Path, input_dir: str | Path) -> list[CasePaths]:
    """Every case of the three folders, matched by name (see the module doc), sorted.

    ``InputError`` when a folder is missing or the target folder holds no TIFF; a case missing
    from some folder, or ambiguous in one, is returned with its ``problem``.
    """
    folders = {"pred": Path(pred_dir), "target": Path(target_dir), "input": Path(input_dir)}
    listed = {role: _tiffs(folder) for role, folder in folders.items()}
    if not listed["target"]:
        raise InputError(f"no .tif/.tiff file in target folder {folders['target']}")
    cases = []
    for key in sorted(set().union(*listed.values())):
        found = {role: listed[role].get(key, []) for role in CASE_ROLES}
        problems = []
        for role in CASE_ROLES:
            if not found[role]:
                problems.append(f"no {_ROLE_NAMES[role]} in {folders[role]}")
            elif len(found[role]) > 1:
                problems.append(f"ambiguous {_ROLE_NAMES[role]}: {', '.join(p.name for p in found[role])}")
        paths = {role: found[role][0] if len(found[role]) == 1 else None for role in CASE_ROLES}
        shown = next((p.name for role in ("input", "pred", "target") for p in found[role]), key)
        cases.append(CasePaths(name=shown, problem="; ".join(problems) or None, **paths))
    return cases


def _inspect(case: CasePaths) -> dict[str, CaseInfo]:
    """Headers of the three files; InputError naming the file, or when shapes differ."""
    infos = {}
    for role in CASE_ROLES:
        try:
            infos[role] = inspect_case(getattr(case, role))
        except InputError as exc:
            raise InputError(f"{_ROLE_NAMES[role]} {exc}") from None
    shapes = {infos[role].shape for role in CASE_ROLES}
    if len(shapes) > 1:
        raise InputError("shapes differ: " + ", ".join(
            f"{_ROLE_NAMES[r]} {'x'.join(map(str, infos[r].shape))}" for r in CASE_ROLES))
    return infos


def case_channel(infos: Mapping[str, CaseInfo], override: str | None = None) -> str:
    """``override``, else the input's metadata channel, else the target's, else from the file name."""
    if override is not None:
        return override
    for role in ("input", "target"):
        if infos[role].meta.channel_in_metadata:
            return infos[role].meta.channel
    return infos["input"].meta.channel


# --------------------------------------------------------------------------- scoring


def non_finite_voxels(volume: Volume) -> int:
    """How many voxels are NaN or Inf (0 for integer volumes, without reading them), slab by slab."""
    if np.dtype(volume.dtype).kind not in "fc":
        return 0
    n_z = volume.shape[0]
    plane = math.prod(volume.shape[1:])
    return sum(int(volume[z0:z1].size - np.count_nonzero(np.isfinite(volume[z0:z1])))
               for z0, z1 in z_slabs(n_z, plane))


def exclusion(ssim: SsimScores | None, seg: SegScores | None) -> str | None:
    """Why a scored case's numbers cannot enter a mean, or None when they can."""
    reasons = []
    if ssim is not None and (ssim.ssim_input >= 1.0 or not math.isfinite(ssim.n_ssim)):
        reasons.append(f"target equals input (SSIM(input, target) = {ssim.ssim_input:.6g}): N-SSIM is "
                       "undefined; were --pred and --gt swapped?")
    elif ssim is not None and not (math.isfinite(ssim.ssim_pred) and math.isfinite(ssim.ssim_input)):
        reasons.append(f"SSIM is not finite (input {ssim.ssim_input}, prediction {ssim.ssim_pred}): N-SSIM is "
                       "undefined")
    if seg is not None and not math.isfinite(seg.n_iou):
        reasons.append(f"N-IoU is undefined (IoU of the input {seg.iou_input:.4g} equals the best IoU "
                       f"{seg.best_iou:g})")
    return "; ".join(reasons) or None


def fit_norms(target: Volume, pred: Volume, input: Volume) -> dict[str, PercentileNorm]:
    """The challenge's normalisation of each volume of a case, by role: one histogram pass each."""
    return {"target": PercentileNorm.fit(target), "pred": PercentileNorm.fit(pred),
            "input": PercentileNorm.fit(input)}


def _ssim_kwargs(options: SsimOptions, target: Volume, target_norm: PercentileNorm, device: str) -> dict[str, Any]:
    data_range = options.data_range
    if data_range == "target":
        low, high = percentiles(target, (0.0, 100.0))
        data_range = (high - low) / target_norm.scale
        if not data_range > 0:
            data_range = 1.0
    return {"window": options.window, "per_slice": options.per_slice, "data_range": float(data_range),
            "win_size": options.win_size, "sigma": options.sigma, "device": device}


def score_volumes(
    target: Volume, pred: Volume, input: Volume, *, channel: str,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0), options: EvalOptions = EvalOptions(),
    segmenters: SegmenterCache | None = None, step: Callable[[str], None] | None = None,
    norms: Mapping[str, PercentileNorm] | None = None,
) -> tuple[SsimScores, SegScores | None]:
    """N-SSIM (and N-IoU unless ``options.segment`` is off) of one case.

    The volumes are arrays or ``io.PagedVolume``s: the SSIM reads the latter a z-slab at a time,
    segmentation reads them whole. ``segmenters`` caches the cellpose models across calls (made
    from ``options`` when None); ``norms`` are ``fit_norms``' (fitted here when None).
    """
    if step is not None:
        step("ssim")
    norms = norms or fit_norms(target, pred, input)
    ssim = score_ssim(target, pred, input, norms=norms,
                      **_ssim_kwargs(options.ssim, target, norms["target"], options.device))
    if not options.segment:
        return ssim, None
    if segmenters is None:
        segmenters = make_segmenters(options)
    target, pred, input = (np.asarray(v) for v in (target, pred, input))  # cellpose needs them whole
    seg = score_segmentation(target, pred, input, voxel_size=voxel_size, segmenter=segmenters.get(channel),
                             options=options.seg, step=step)
    return ssim, seg


def make_segmenters(options: EvalOptions) -> SegmenterCache:
    return SegmenterCache(models=dict(options.cellpose_models), device=options.device,
                          allow_download=options.allow_download)


def _uncertainty(options: EvalOptions, case: CasePaths, shape: tuple[int, ...],
                 files: contextlib.ExitStack) -> Volume | None:
    if options.uncertainty_dir is None:
        return None
    matches = _tiffs(options.uncertainty_dir).get(case_key(case.name), [])
    if len(matches) != 1:
        log.warning("%s: %s uncertainty file in %s, drawn without it", case.name,
                    "no" if not matches else "more than one", options.uncertainty_dir)
        return None
    try:
        info = inspect_case(matches[0])
        if info.shape != shape:
            log.warning("%s: uncertainty has shape %s, not %s; drawn without it", case.name, info.shape, shape)
            return None
        return files.enter_context(opened_volume(matches[0], info=info))
    except InputError as exc:
        log.warning("%s: uncertainty %s; drawn without it", case.name, exc)
        return None


def score_case(case: CasePaths, options: EvalOptions, segmenters: SegmenterCache | None = None,
               infos: Mapping[str, CaseInfo] | None = None,
               step: Callable[[str], None] | None = None) -> ScoredCase:
    """Read and score one case; every expected failure becomes ``ScoredCase.error``."""
    start = time.perf_counter()
    result = ScoredCase(case=case.name)
    files = contextlib.ExitStack()
    try:
        if case.problem:
            raise InputError(case.problem)
        infos = infos or _inspect(case)
        result.channel = case_channel(infos, options.channel)
        study = infos["input"].meta.study
        result.study = study if study is not None else infos["target"].meta.study
        if step is not None:
            step("reading")
        volumes = {}
        for role in CASE_ROLES:
            try:
                volumes[role] = files.enter_context(opened_volume(getattr(case, role), info=infos[role]))
            except InputError as exc:
                raise InputError(f"{_ROLE_NAMES[role]} {exc}") from None
        for role in CASE_ROLES:
            bad = non_finite_voxels(volumes[role])
            if bad:
                raise InputError(f"{_ROLE_NAMES[role]} {getattr(case, role).name} has {bad} non-finite "
                                 "voxel(s) (NaN/Inf): its normalisation and SSIM are undefined, not scored")
        voxel_size = infos["target"].meta.voxel_size.zyx
        if infos["input"].meta.voxel_size.zyx != voxel_size:
            log.debug("%s: input voxel size %s differs from the target's %s; using the target's",
                      case.name, infos["input"].meta.voxel_size.zyx, voxel_size)
        norms = fit_norms(volumes["target"], volumes["pred"], volumes["input"])
        result.ssim, result.seg = score_volumes(
            volumes["target"], volumes["pred"], volumes["input"], channel=result.channel,
            voxel_size=voxel_size, options=options, segmenters=segmenters, step=step, norms=norms)
        result.excluded = exclusion(result.ssim, result.seg)
        if options.png_dir is not None:
            if step is not None:
                step("png")
            try:
                result.picture = _picture(case, volumes, voxel_size, options, files, norms, result)
            except (OSError, ValueError, InputError) as exc:  # the scores stand without their picture
                log.warning("%s: no PNG (%s)", case.name, exc)
    except FuseCareError as exc:
        result.error = str(exc)
    except MemoryError:
        result.error = "out of memory"
    except Exception as exc:  # noqa: BLE001 - a scoring run must go on with the other cases
        log.debug("%s: unexpected failure", case.name, exc_info=True)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        result.error = f"{type(exc).__name__}: {first_line} (--debug for the traceback)"
    finally:
        files.close()
    result.seconds = time.perf_counter() - start
    return result


def _picture(case: CasePaths, volumes: Mapping[str, Volume], voxel_size: Sequence[float],
             options: EvalOptions, files: contextlib.ExitStack, norms: Mapping[str, PercentileNorm],
             result: ScoredCase) -> Any:
    """The case's projections, kept until the run is scored so all PNGs share one difference scale."""
    from fusecare.scoring.figures import case_picture

    uncertainty = _uncertainty(options, case, volumes["target"].shape, files)
    picture = case_picture(volumes["input"], volumes["pred"], volumes["target"], voxel_size,
                           uncertainty=uncertainty, norms=norms, case=case.name, channel=result.channel)
    if result.ssim is not None:
        picture.scores["n_ssim"] = result.ssim.n_ssim
    if result.seg is not None:
        picture.scores["n_iou"] = result.seg.n_iou
    return picture


def draw_pngs(results: Sequence[ScoredCase], png_dir: str | Path) -> None:
    """Draw every kept picture to ``png_dir/<case key>.png`` on the run's shared colour scales."""
    from fusecare.scoring.figures import render_case_png, run_scales

    scales = run_scales(r.picture for r in results if r.picture is not None)
    for result in results:
        if result.picture is None:
            continue
        try:
            result.png = render_case_png(Path(png_dir) / f"{case_key(result.case)}.png", result.picture, scales)
        except (OSError, ValueError) as exc:  # the scores stand without their picture
            log.warning("%s: no PNG (%s)", result.case, exc)
        result.picture = None


def _describe(result: ScoredCase) -> str:
    if not result.ok:
        return f"FAILED {result.case}: {result.error}"
    if result.excluded:
        return f"EXCLUDED from the means {result.case}: {result.excluded}"
    text = f"{result.case} ({result.channel}): N-SSIM {result.ssim.n_ssim:+.4f}" if result.ssim else result.case
    if result.seg is not None:
        text += (f", N-IoU {result.seg.n_iou:+.4f} (IoU input {result.seg.iou_input:.4f}, "
                 f"prediction {result.seg.iou_pred:.4f})")
    return text + f" [{result.seconds:.1f} s]"


def evaluate_folder(pred_dir: str | Path, target_dir: str | Path, input_dir: str | Path,
                    options: EvalOptions = EvalOptions()) -> list[ScoredCase]:
    """Score every case of the three folders; one ``ScoredCase`` per case, failures included.

    Raises ``InputError`` for a missing folder or an empty target folder, ``WeightsError``
    when a cellpose model a case needs cannot be had (before any case is scored).
    """
    cases = pair_cases(pred_dir, target_dir, input_dir)
    if options.uncertainty_dir is not None and not Path(options.uncertainty_dir).is_dir():
        raise InputError(f"uncertainty folder not found: {options.uncertainty_dir}")
    plans: list[tuple[CasePaths, dict[str, CaseInfo] | None, ScoredCase | None]] = []
    for case in cases:
        try:
            if case.problem:
                raise InputError(case.problem)
            plans.append((case, _inspect(case), None))
        except FuseCareError as exc:
            plans.append((case, None, ScoredCase(case=case.name, error=str(exc))))
    segmenters = make_segmenters(options) if options.segment else None
    if segmenters is not None:
        for channel in sorted({case_channel(infos, options.channel) for _, infos, _ in plans if infos}):
            segmenters.get(channel)  # WeightsError now, not once per case
    results: list[ScoredCase] = []
    with tqdm(plans, desc="scoring", unit="case", disable=not options.progress, dynamic_ncols=True) as bar:
        for case, infos, failed in bar:
            bar.set_postfix_str(case.name)

            def step(stage: str, name: str = case.name) -> None:
                bar.set_postfix_str(f"{name}: {stage}")

            result = failed or score_case(case, options, segmenters, infos, step)
            level = logging.ERROR if not result.ok else logging.WARNING if result.excluded else logging.INFO
            log.log(level, "%s", _describe(result))
            results.append(result)
    if options.png_dir is not None:
        draw_pngs(results, options.png_dir)
    return results


def all_scored(results: Sequence[ScoredCase]) -> bool:
    """Every case scored and counted in the means (none failed, none excluded)."""
    return all(r.counted for r in results)


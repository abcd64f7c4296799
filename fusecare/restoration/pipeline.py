"""Restore cases end to end: read, normalise, tiled ensemble prediction, gate, write uint16.

Do no harm: a case that fails for any reason after it was read (no weights for its channel,
a corrupt model, CUDA out of memory twice, a non-finite prediction, ...) gets its input written
back unchanged, which scores exactly 0 where a missing output scores worse. Each such fallback
is logged as one ERROR line naming the case and the reason; the folder run goes on. A file
that cannot be read at all (any exception while opening, parsing or decoding it) gets one
``FAILED <file>: <reason>`` line and no output; the run goes on with the next case.

This module runs a case in order and falls back; how a case is tiled within the host's memory
lives in ``planning``, its time budget in ``pacing``, and the map of intensities to uint16 in
``intensities``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fusecare.config import Config, param
from fusecare.constants import DEFAULT_TIME_BUDGET, ILLUMINATION_FACES, UNCERTAINTY_UNIT
from fusecare.device import inference_device, to_device
from fusecare.errors import FuseCareError, InputError, one_line
from fusecare.io import (
    CHANNELS,
    MEMBRANE,
    CaseMeta,
    VoxelSize,
    inspect_case,
    list_cases,
    read_case,
    stale_partials,
    write_case,
)
from fusecare.normalize import FMC_PERCENTILES, PercentileNorm, percentiles
from fusecare.profiling import phase
from fusecare.restoration.attenuation import AttenuationField, CorrectedView, view_field
from fusecare.restoration.ensemble import Ensemble, load_ensemble
from fusecare.restoration.gate import (
    GateConfig,
    gate_fields,
    gate_fields_torch,
    gated_fields,
    gated_fields_torch,
)
from fusecare.restoration.intensities import (
    UINT16_MAX,
    Uint16Map,
    input_as_uint16,
    replace_non_finite,
    rescale_float,
)
from fusecare.restoration.pacing import Cheaper, Deadline, Mode, Pacer
from fusecare.restoration.planning import (
    BLEND_CHUNK_VOXELS,
    OOM_CORE_FLOOR,
    available_memory,
    default_plan,
    feasible_tile,
    gated_tiling,
    required_memory,
    shrink_core,
)
from fusecare.restoration.tiling import Region, Splitter, predict_normalised

log = logging.getLogger(__name__)


class ConstantVolumeError(FuseCareError):
    """p2 == p99.8: there is no structure to restore."""


class NonFinitePredictionError(FuseCareError):
    """The network produced NaN or Inf."""


class InputOnlyGateError(FuseCareError):
    """The ensemble's calibrated gate keeps the input: predicting would change nothing."""


# --------------------------------------------------------------------------- one volume


class RestoreOptions(Config):
    """How to restore: tile, device, precision, gating, uncertainty output, memory and time budget."""

    tile: tuple[int, int, int] | None = None
    device: str = "auto"
    fp16: bool = True
    """float16 autocast on CUDA (ignored on CPU): half the memory and tensor cores; measured within
    1e-3 of float32 on the shipped members, and a block that overflows is redone in float32."""
    gate: bool = True
    attenuation_correction: bool = True
    """Apply the calibrated gate's attenuation correction where it has one, and feed members trained
    on corrected views (``ModelConfig.corrected_input``) the corrected view (off: the gate alone,
    and such members read the view itself; for views whose far side is not dimmed, or whose
    dimming the target keeps)."""
    light_from: str | None = param(None, choices=ILLUMINATION_FACES, doc=(
        "The face the light sheet entered every case from (``fusecare.constants.ILLUMINATION_FACES``, "
        "e.g. ``\"x start\"``), when the microscope's user knows it; None: estimated from each view. "
        "Used only by a gate that corrects attenuation, or members that read the corrected view."))
    uncertainty_dir: Path | None = None
    memory_limit: int | None = None
    progress: bool = True
    time_budget: float | None = DEFAULT_TIME_BUDGET
    clock: Callable[[], float] = time.monotonic
    imagej: bool = False
    """Write ImageJ hyperstacks calibrated in microns (Fiji, napari) instead of the challenge's files."""


@dataclass
class Restored:
    output: np.ndarray
    uncertainty: np.ndarray | None = None
    clipped: int = 0
    tile: tuple[int, int, int] | None = None
    modes: dict[str, int] = field(default_factory=dict)
    """Tiles per prediction mode (``Pacer.summary``): more than one entry when the budget bit."""


MAX_OOM_RETRIES = 4

DEFERRED_GATE_SECONDS_PER_VOXEL = 3e-7
"""Time reserved per voxel for the deferred gate, which runs after the pacer's last decision:
about twice the 1.4e-7 s measured on the 2-core development CPU (1.3 s for 64x384x384)."""


WHOLE: Region = (slice(None),) * 3  # type: ignore[assignment]
"""A sink's core when it gets the core itself (no gate, so no widening)."""


def covered(core: Region, core_within: Region, shape: tuple[int, ...]) -> Region:
    """The volume region a sink's prediction of ``shape`` covers: the core region ``core``
    widened as ``core_within`` (the core's slices within the prediction) says."""
    starts = [c.start - (w.start or 0) for c, w in zip(core, core_within)]
    return tuple(slice(s, s + n) for s, n in zip(starts, shape))


def field_over(attenuation: AttenuationField | None, region: Region) -> np.ndarray | None:
    """The attenuation field over ``region``, or None without a correction (the gate's default)."""
    return None if attenuation is None else attenuation.region(region)


def gate_in_z_slabs(volume: np.ndarray, mean: np.ndarray, spread: np.ndarray, gate: GateConfig,
                    norm: PercentileNorm, *, planes: int, input_cores: Sequence[Region] = (),
                    attenuation: AttenuationField | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """The gate over a whole volume, smoothed ``planes`` z-planes at a time: z-ranges with their
    gated values (normalised), as ``gated_fields`` of ``gate_fields`` over the whole volume gives
    them; the blend runs on at most ``BLEND_CHUNK_VOXELS`` at a time (7x faster than on a whole
    64x384x384 slab, whose temporaries leave the cache and fault in fresh pages).

    ``mean`` and ``spread`` are the members' of the whole volume. Each slab is read widened by the
    gate's reach (``GateConfig.radius``) in z, clipped at the volume's ends, with whole planes: the
    smoothing's reflection at the volume's borders is then the whole volume's own, and every
    plane of the slab saw all it reaches. ``input_cores`` (written as the input itself, where
    ``mean`` holds the normalised input) keep their mean: the gate would smooth the input there.
    """
    depth, reach, plane = volume.shape[0], gate.radius, math.prod(volume.shape[1:])
    step = max(1, BLEND_CHUNK_VOXELS // plane)
    for z0 in range(0, depth, planes):
        z1 = min(z0 + planes, depth)
        w0, w1 = max(z0 - reach, 0), min(z1 + reach, depth)
        with phase("gate smoothing", (w1 - w0) * plane):
            fields = gate_fields(gate, norm.forward(volume[w0:w1]), mean[w0:w1], spread[w0:w1])
        for c0 in range(z0, z1, step):  # the blend's temporaries stay small (and in cache)
            c1 = min(c0 + step, z1)
            with phase("gate blend, uint16 map", (c1 - c0) * plane):
                gated_planes = gated_fields(fields[:, c0 - w0:c1 - w0], gate,
                                            field_over(attenuation, (slice(c0, c1),)))
                for core in input_cores:
                    if core[0].start < c1 and core[0].stop > c0:
                        zs = slice(max(core[0].start, c0), min(core[0].stop, c1))
                        gated_planes[(slice(zs.start - c0, zs.stop - c0), *core[1:])] = mean[(zs, *core[1:])]
            yield slice(c0, c1), gated_planes
        del fields, gated_planes  # before the next slab's fields: one slab's at a time


FULL_MODE = "all members"
INPUT_MODE = "the input itself"


def restore_volume(
    volume: np.ndarray,
    predict_block: Callable[[np.ndarray], np.ndarray],
    *,
    tile: tuple[int, int, int],
    margin: int,
    align: int,
    gate: GateConfig | None = None,
    with_uncertainty: bool = False,
    progress: str | None = None,
    max_oom_retries: int = MAX_OOM_RETRIES,
    deadline: Deadline | None = None,
    cheaper: Cheaper | None = None,
    name: str = "volume",
    device: torch.device | None = None,
    gate_slab: int | None = None,
    voxel_size_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
    light_from: str | None = None,
    corrected_input: bool = False,
) -> Restored:
    """Predict ``volume`` (any dtype) with ``predict_block`` (normalised block -> mean, spread).

    Normalises with the challenge's percentiles, gates toward the input when a ``gate`` is
    given, maps back to the input's intensities and to uint16 (see ``Uint16Map``). The gate
    smooths, so it needs context beyond the network's: by default the tiles widen by its reach
    and each core is gated as it comes (``gated_tiling``); with ``gate_slab`` (host only,
    ``TilePlan``) the tiles keep the network's margin alone, the members' mean and spread of
    every core are kept for the whole volume, and the gate runs after the last tile over z-slabs
    of that many planes (``gate_in_z_slabs``); both equal the gate of the whole volume when every
    tile ran in one mode (under a time budget, the deferred gate of a predicted core next to one
    written as the input reaches into that input). On CUDA
    out-of-memory the longest core is halved, margins kept (``shrink_core``), and the whole volume
    retried, up to ``max_oom_retries`` times; below the floor the error propagates (the case falls back).
    With a ``deadline``, tiles that would not finish in time are predicted with ``cheaper`` or
    written as the input itself (``Pacer``); cores partition the volume, so modes mix per tile.

    With a ``device``, ``predict_block`` (and ``cheaper``'s) take a tensor on it and return a
    (2, Z, Y, X) tensor there (``Ensemble.predict_tensor``); the gate, the inverse normalisation
    and the uint16 map run there too (``fusecare.restoration.gate``'s torch twins), and only the finished
    uint16 core (and the uncertainty's) comes back to the host.

    A gate that corrects attenuation (``GateConfig.correct_attenuation``) first reads the whole
    volume once more for the field (``estimate_attenuation``, on a coarse grid, with the physical
    ``voxel_size_zyx``; ``light_from`` names the light's entry face when known), then multiplies
    every gated core by it; cores written as the input itself stay the input.

    With ``corrected_input`` (members trained on corrected views, ``Ensemble.corrected_input``)
    the field is estimated whatever the gate, the tiles are read from the view times it
    (``CorrectedView``), and every prediction reaching a sink (mean, spread, and the block the
    gate falls back to) is divided by the field first, so the gate blends in the view's own
    brightness, as calibration does; the gate then multiplies the field back (it is made to
    correct attenuation if it did not). Ungated, the output is the members' mean as they predicted
    it. Cores the time budget writes as the input are the view again (within one count of the
    uint16 map: the block was multiplied and divided by the field). A field of ones (none found,
    or rejected by its guard) leaves the view as it is. The uncertainty is the members' own spread.
    """
    # one histogram pass gives the range for the uint16 map and the challenge's percentiles
    with phase("percentiles", volume.size):
        minimum_value, p_low, p_high, maximum_value = percentiles(volume, (0.0, *FMC_PERCENTILES, 100.0))
    norm = PercentileNorm(low=p_low, high=p_high)
    if norm.is_degenerate:
        raise ConstantVolumeError(f"constant volume (p2 == p99.8 == {norm.low:g}): nothing to restore")
    to_uint16 = Uint16Map.for_input(minimum_value, maximum_value)
    attenuation = None
    defer = gate is not None and gate_slab is not None
    if defer and device is not None:
        raise ValueError("the deferred gate runs on the host only: no gate_slab with a device")
    if defer and deadline is not None:  # the tiles must leave time for the gate that follows them
        deadline = Deadline(deadline.at - DEFERRED_GATE_SECONDS_PER_VOXEL * volume.size, deadline.clock)
    correcting_gate = gate is not None and gate.correct_attenuation
    if (correcting_gate or corrected_input) and deadline is not None and deadline.remaining() <= 0:
        # every tile will be written as the input itself, which the field never touches
        log.warning("%s: time budget spent before the attenuation estimate: skipped", name)
        gate, corrected_input = (gate.replace(correct_attenuation=False) if gate else None), False
    if (gate is not None and gate.correct_attenuation) or corrected_input:
        with phase("attenuation estimate", volume.size):
            attenuation = view_field(volume, voxel_size_zyx, norm, light_from=light_from)
        log.log(logging.WARNING if attenuation.rejected else logging.INFO, "%s: attenuation correction: %s%s",
                name, attenuation.describe(), " (the members read the corrected view)" if corrected_input else "")
        if attenuation.is_identity:  # a field of ones: nothing to interpolate per core
            gate, attenuation = (gate.replace(correct_attenuation=False) if gate else None), None
    divide = corrected_input and attenuation is not None
    source = CorrectedView(volume, attenuation, norm.low) if divide else volume  # type: ignore[arg-type]
    if divide and gate is not None and not gate.correct_attenuation:
        # the members undid the dimming, so every gate puts the field back on what it blends (as
        # calibration scores such ensembles' gates)
        gate = gate.replace(correct_attenuation=True)
    output = np.empty(volume.shape, dtype=np.uint16)
    uncertainty = np.empty(volume.shape, dtype=np.uint16) if with_uncertainty else None
    clipped = 0

    if gate_slab is not None and gate_slab < 1:
        raise ValueError(f"gate_slab must be at least 1 plane, got {gate_slab}")
    # Gated per core, the sink gets the members' mean and spread (and the normalised block) over
    # each core widened by the gate's reach, not the whole tile: the gate smooths that much once
    # per core instead of the whole widened tile (a 64x200x200 tile of a 64x384x384 case: 64x168x168).
    network_margin = margin
    if not defer:
        tile, margin = gated_tiling(tile, margin, align, gate)
    gate_reach = margin - network_margin
    members_mean = np.empty(volume.shape, dtype=np.float32) if defer else None
    members_spread = np.empty(volume.shape, dtype=np.float32) if defer else None
    input_cores: list[Region] = []  # written as the input itself by the pacer: kept so by the deferred gate

    def sink(region: Region, prediction: np.ndarray, core: Region = WHOLE) -> None:
        nonlocal clipped
        members, field = prediction, None
        ungated_members = divide and gate is None and len(prediction) == 3  # written as they predicted
        if divide and not ungated_members:  # to the view's own brightness, as the gate expects
            wide = attenuation.region(covered(region, core, prediction.shape[-3:]))  # type: ignore[union-attr]
            prediction, field = prediction / wide, wide[core]
        elif len(prediction) == 3 and gate is not None:
            field = field_over(attenuation, region)
        mean, spread = prediction[0], prediction[1]
        if not (np.isfinite(mean).all() and np.isfinite(spread).all()):
            raise NonFinitePredictionError("the network produced NaN/Inf")
        if ungated_members:
            mean = mean[core]
        elif len(prediction) == 3:  # gated (the input mode gives mean and spread only)
            with phase("gate smoothing", mean.size):
                fields = gate_fields(gate, prediction[2], mean, spread)
            with phase("gate blend, uint16 map", math.prod(s.stop - s.start for s in region)):
                mean = gated_fields(fields[(slice(None), *core)], gate, field)
        else:
            mean = mean[core]
        with phase("gate blend, uint16 map", math.prod(s.stop - s.start for s in region)):
            output[region], n = to_uint16.apply(norm.inverse(mean))
            clipped += n
            if uncertainty is not None:
                uncertainty[region] = np.clip(np.rint(members[1][core] / UNCERTAINTY_UNIT), 0, UINT16_MAX)

    def sink_deferred(region: Region, prediction: np.ndarray) -> None:
        """The members' mean and spread of a core kept for the gate after the last tile."""
        members = prediction
        if divide:
            prediction = prediction / field_over(attenuation, region)  # type: ignore[operator]
        mean, spread = prediction[0], prediction[1]
        if not (np.isfinite(mean).all() and np.isfinite(spread).all()):
            raise NonFinitePredictionError("the network produced NaN/Inf")
        members_mean[region] = mean  # type: ignore[index]
        members_spread[region] = spread  # type: ignore[index]
        if pacer.last is modes[-1]:  # the host path predicts and sinks each tile in turn
            input_cores.append(region)
        if uncertainty is not None:
            uncertainty[region] = np.clip(np.rint(members[1] / UNCERTAINTY_UNIT), 0, UINT16_MAX)

    scale, low = float(np.float32(norm.scale)), float(np.float32(norm.low))

    def sink_tensor(region: Region, prediction: torch.Tensor, core: Region = WHOLE) -> None:
        """``sink`` on the device: the same arithmetic, in float32, by the gate's torch twins."""
        nonlocal clipped
        members, field = prediction, None  # fresh arrays from the field: no copy needed to hand them to torch
        ungated_members = divide and gate is None and len(prediction) == 3  # written as they predicted
        if divide and not ungated_members:  # to the view's own brightness, as the gate expects
            wide = torch.from_numpy(attenuation.region(  # type: ignore[union-attr]
                covered(region, core, prediction.shape[-3:]))).to(prediction.device)
            prediction, field = prediction / wide, wide[core]
        elif len(prediction) == 3 and gate is not None and attenuation is not None:
            field = torch.from_numpy(attenuation.region(region)).to(prediction.device)
        if not bool(torch.isfinite(prediction[:2]).all()):
            raise NonFinitePredictionError("the network produced NaN/Inf")
        if ungated_members:
            mean = prediction[0][core]
        elif len(prediction) == 3:  # gated (the input mode gives mean and spread only)
            with phase("gate smoothing", prediction[0].numel()):
                fields = gate_fields_torch(gate, prediction[2], prediction[0], prediction[1])
            mean = gated_fields_torch(fields[(slice(None), *core)], gate, field)
        else:
            mean = prediction[0][core]
        with phase("gate blend, uint16 map", math.prod(s.stop - s.start for s in region)):
            output[region], n = to_uint16.apply_tensor(mean * scale + low)
            clipped += n
            if uncertainty is not None:
                units = torch.round(members[1][core] / UNCERTAINTY_UNIT).clamp_(0, UINT16_MAX)
                uncertainty[region] = units.to(torch.uint16).cpu().numpy()

    def fields(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """What the sink gets for a whole tile from ``predict``: mean and spread, and, gated (or
        with members that read the corrected view, so that the sink tells their tiles from the
        input mode's), the normalised block the gate falls back to; on ``device``, as a tensor there."""
        with_fallback = gate is not None or divide
        if device is not None:
            def on_device(block: np.ndarray) -> torch.Tensor:
                x = to_device(block, device)
                prediction = predict(x)
                return torch.cat([prediction, x[None]]) if with_fallback else prediction
            return on_device
        if not with_fallback or defer:
            return predict

        def with_block(block: np.ndarray) -> np.ndarray:
            return np.concatenate([predict(block), block[None]])
        return with_block

    def input_fields(block: np.ndarray) -> np.ndarray | torch.Tensor:
        """The block itself as the mean, spread 0, and no block to gate with: the sink writes it as it is."""
        layers = no_prediction(block)
        return layers if device is None else to_device(layers, device)

    modes = [Mode(FULL_MODE, fields(predict_block), 1.0)]
    if cheaper is not None:
        modes.append(Mode(cheaper.description, fields(cheaper.predict_block), cheaper.relative_cost))
    modes.append(Mode(INPUT_MODE, input_fields, 0.0))
    pacer = Pacer(modes, deadline, name)
    feasible = feasible_tile(tile, volume.shape, margin, align)
    if feasible != tile:
        log.warning("tile %s rounded up to %s: sides must be multiples of %d and leave room for %d "
                    "voxels of context on both sides", tile, feasible, align, margin)
        tile = feasible  # type: ignore[assignment]
    host_sink = sink_deferred if defer else sink
    for attempt in range(max_oom_retries + 1):
        try:
            pacer.start(len(Splitter(tile, margin, align).tiles(volume.shape)))
            input_cores.clear()
            predict_normalised(source, pacer, tile=tile, margin=margin, align=align, norm=norm,
                               sink=host_sink if device is None else sink_tensor, sink_context=gate_reach,
                               overlap=device is not None, progress=progress)
            break
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = shrink_core(tile, volume.shape, margin=margin, align=align)
            if attempt == max_oom_retries or smaller == tile:
                raise
            log.warning("CUDA out of memory with tile %s; retrying with tile %s (margins of %d kept, "
                        "cores shrink to at least %d margins)", tile, smaller, margin, OOM_CORE_FLOOR)
            tile = smaller
    if defer:
        if len(input_cores) == pacer.total:  # every core is the input: nothing to gate
            slabs: Iterator[tuple[slice, np.ndarray]] = (
                (slice(z, z + gate_slab), members_mean[z:z + gate_slab])  # type: ignore[index, operator]
                for z in range(0, volume.shape[0], gate_slab))  # type: ignore[arg-type]
        else:
            slabs = gate_in_z_slabs(volume, members_mean, members_spread, gate, norm,  # type: ignore[arg-type]
                                    planes=gate_slab, input_cores=input_cores,  # type: ignore[arg-type]
                                    attenuation=attenuation)
        for planes, gated_planes in slabs:
            with phase("gate blend, uint16 map"):  # its voxels are counted once, by the blend
                output[planes], n = to_uint16.apply(norm.inverse(gated_planes))
                clipped += n
    if clipped:
        log.warning("%d voxel(s) beyond the uint16 headroom were clipped", clipped)
    return Restored(output=output, uncertainty=uncertainty, clipped=clipped, tile=tile, modes=pacer.summary)


# --------------------------------------------------------------------------- cases and folders


CaseStatus = Literal["restored", "fallback", "failed"]


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one case; ``failed`` means no output could be written."""

    name: str
    status: CaseStatus
    message: str = ""
    seconds: float = 0.0


@dataclass
class EnsembleCache:
    """Loads each channel's ensemble at most once per run; remembers load failures too."""

    weights_dir: Path
    device: torch.device
    fp16: bool = False
    _loaded: dict[str, Ensemble | FuseCareError] = field(default_factory=dict)

    def get(self, channel: str) -> Ensemble:
        if channel not in self._loaded:
            try:
                ensemble = load_ensemble(self.weights_dir / channel, device=self.device, fp16=self.fp16)
                if ensemble.channel != channel:
                    log.warning("%s: its manifest says %s, yet it restores the %s cases (its gate was "
                                "calibrated for %s content)", self.weights_dir / channel, ensemble.channel,
                                channel, ensemble.channel)
                self._loaded[channel] = ensemble
            except FuseCareError as exc:
                self._loaded[channel] = exc
        entry = self._loaded[channel]
        if isinstance(entry, FuseCareError):
            raise entry
        return entry


def _reason(exc: BaseException, name: str) -> str:
    """``errors.one_line`` without a leading ``<name>: `` (the FAILED line names the file already)."""
    text = one_line(exc)
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


class ConstantOutputError(FuseCareError):
    """The uint16 output came out constant although the input is not."""


def restore_case(path: Path, output_dir: Path, ensembles: EnsembleCache,
                 options: RestoreOptions) -> CaseOutcome:
    """Restore one file into ``output_dir`` (same name), falling back to the input on failure.

    Reading: any failure (the readers turn whatever a damaged file raises into ``InputError``;
    anything else, e.g. MemoryError, is caught here too) is one ``FAILED <file>: <reason>`` line
    and no output. After the case was read: any failure, ours included, writes the input back
    (``FALLBACK``), and only a failing write of that is FAILED. Success is logged after the file
    is in place, never before.
    """
    start = time.perf_counter()
    name = path.name
    deadline = Deadline.after(options.time_budget, options.clock) if options.time_budget is not None else None

    def failed(reason: str) -> CaseOutcome:
        log.error("FAILED %s: %s; no output written", name, reason)
        return CaseOutcome(name, "failed", reason, time.perf_counter() - start)

    try:
        with phase("read"):
            info = inspect_case(path)
            limit = options.memory_limit if options.memory_limit is not None else available_memory()
            need = required_memory(info, with_uncertainty=options.uncertainty_dir is not None)
            if need > limit:
                raise InputError(
                    f"{name}: volume {info.shape} {info.dtype} needs about {need / 1e9:.1f} GB of memory, "
                    f"{limit / 1e9:.1f} GB available; refusing before reading it"
                )
            case = read_case(path, info=info)
            for note in case.meta.notes:
                log.warning("%s: %s", name, note)
            volume = rescale_float(replace_non_finite(case.volume, name), name)
    except FuseCareError as exc:
        return failed(_reason(exc, name))
    except Exception as exc:  # noqa: BLE001 - one rule: a case that cannot be read fails alone
        log.debug("%s: reading failed", name, exc_info=True)
        return failed(_reason(exc, name))
    try:
        restored = _predict_case(volume, case.meta, ensembles, options, name, deadline)
        if restored.output.size and restored.output.min() == restored.output.max():
            raise ConstantOutputError("the output came out constant although the input is not")
        with phase("write"):
            _write_outputs(output_dir / name, restored, case.meta, options)
        status, message = "restored", f"restored with tile {restored.tile}"
        if len(restored.modes) > 1 or FULL_MODE not in restored.modes:
            message += " (over its time budget, tiles per mode: " + ", ".join(
                f"{mode} {count}" for mode, count in restored.modes.items()) + ")"
    except Exception as exc:  # noqa: BLE001 - do no harm: any failure falls back to the input
        message = one_line(exc)
        log.debug("traceback of the fallback", exc_info=True)
        try:
            write_case(output_dir / name, input_as_uint16(volume), case.meta, imagej=options.imagej)
        except Exception as write_exc:  # noqa: BLE001 - the run goes on with the next case
            log.debug("traceback of the failed fallback write", exc_info=True)
            return failed(f"{message}; writing the input back failed too: {_reason(write_exc, name)}")
        log.error("case %s FALLBACK, wrote the input back unchanged (scores N-SSIM 0): %s", name, message)
        status = "fallback"
    seconds = time.perf_counter() - start
    log.info("case %s %s in %.1f s", name, status, seconds)
    return CaseOutcome(name, status, message, seconds)


def cheaper_members(ensemble: Ensemble, *, on_device: bool = False) -> Cheaper | None:
    """Half the members, never fewer than two: with one member the spread is 0 and the gate's
    main safety term would silently be off, a mode no calibration validated."""
    n = len(ensemble.members)
    k = max(2, n // 2)
    if k >= n:
        return None
    predict = ensemble.predict_tensor if on_device else ensemble.predict_block
    return Cheaper(f"{k} of {n} members", functools.partial(predict, members=k), k / n)


def no_prediction(block: np.ndarray) -> np.ndarray:
    """The block itself as the members' mean, with no spread: what a gate that uses no prediction
    (``GateConfig.needs_prediction`` false) is given instead of running the network."""
    return np.stack([block, np.zeros_like(block)]).astype(np.float32, copy=False)


def _predict_case(volume: np.ndarray, meta: CaseMeta, ensembles: EnsembleCache,
                  options: RestoreOptions, name: str, deadline: Deadline | None = None,
                  *, with_uncertainty: bool | None = None) -> Restored:
    ensemble = ensembles.get(meta.channel)
    gate = ensemble.gate if options.gate else None
    if gate is not None and gate.correct_attenuation and not options.attenuation_correction:
        gate = gate.replace(correct_attenuation=False)
    # members trained on corrected views read the view itself when the correction is off, as
    # where no field was found
    corrected_input = ensemble.corrected_input and options.attenuation_correction
    if ensemble.corrected_input and not corrected_input:
        log.warning("%s: the %s members were trained on attenuation-corrected views; with the correction "
                    "off they read the view itself", name, meta.channel)
    if options.light_from is not None and (gate is None or not gate.correct_attenuation) and not corrected_input:
        log.warning("%s: light from %s ignored: the %s gate %s no attenuation correction", name,
                    options.light_from, meta.channel, "is off, so" if gate is None else "has")
    uncertain = options.uncertainty_dir is not None if with_uncertainty is None else with_uncertainty
    plan = default_plan(ensemble, volume.shape, gate=gate, tile=options.tile,
                        held_bytes_per_voxel=volume.dtype.itemsize + 2 + (2 if uncertain else 0))
    if gate is not None and gate.keeps_input:
        why = ("uses no prediction, and its attenuation correction is switched off "
               "(--no-attenuation-correction)" if ensemble.gate is not None and ensemble.gate.correct_attenuation
               else "is input-only (its validation found no correction that kept every case >= 0)")
        raise InputOnlyGateError(f"the {meta.channel} ensemble's calibrated gate {why}; "
                                 "--no-gate runs the ensemble anyway")
    log.info("%s: channel %s, %d member(s), shape %s, voxel %s um, tile %s, gate %s%s",
             name, meta.channel, len(ensemble.members), volume.shape, meta.voxel_size.zyx,
             plan.tile, gate.to_dict() if gate else "off",
             f" (after the network, in z-slabs of {plan.gate_slab} planes)" if gate and plan.defers_gate else "")
    on_device = ensemble.device.type == "cuda"  # the gate and the uint16 map run beside the network
    predict, cheaper = (ensemble.predict_tensor if on_device else ensemble.predict_block,
                        cheaper_members(ensemble, on_device=on_device))
    if gate is not None and not gate.needs_prediction and not uncertain:
        log.info("%s: the gate uses no prediction (blend 0): the network is skipped", name)
        predict, cheaper, on_device, corrected_input = no_prediction, None, False, False
    return restore_volume(
        volume, predict,
        tile=plan.tile, margin=ensemble.margin, align=ensemble.alignment, gate=gate,
        with_uncertainty=uncertain, progress=name if options.progress else None,
        deadline=deadline, cheaper=cheaper, name=name, device=ensemble.device if on_device else None,
        gate_slab=None if on_device else plan.gate_slab, voxel_size_zyx=meta.voxel_size.zyx,
        light_from=options.light_from, corrected_input=corrected_input,
    )


def _write_outputs(path: Path, restored: Restored, meta: CaseMeta, options: RestoreOptions) -> None:
    write_case(path, restored.output, meta, imagej=options.imagej)
    if options.uncertainty_dir is not None and restored.uncertainty is not None:
        unc_meta = dataclasses.replace(meta, raw={**meta.raw, "content": "ensemble spread",
                                                  "uncertainty_unit": UNCERTAINTY_UNIT,
                                                  "uncertainty_scale": "normalised intensity (p2 -> 0, p99.8 -> 1)"})
        write_case(options.uncertainty_dir / path.name, restored.uncertainty, unc_meta, imagej=options.imagej)


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it, symbolic links and ``..`` resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def restore_folder(input_dir: str | Path, output_dir: str | Path, weights_dir: str | Path,
                   options: RestoreOptions = RestoreOptions()) -> list[CaseOutcome]:
    """Restore every case of ``input_dir`` into ``output_dir``; ``InputError`` if there is none."""
    list_cases(input_dir)  # InputError for a missing or empty folder, before anything is created
    return restore_paths([input_dir], output_dir, weights_dir, options)


def _refuse_overwriting(folder: Path | None, what: str, inputs: Sequence[Path]) -> None:
    """An output folder that is an input folder (or inside one), or the folder of an input file,
    would overwrite or mix with the inputs: ``FuseCareError``, before anything is written."""
    if folder is None:
        return
    for path in inputs:
        if path.is_dir() and is_within(folder, path):
            raise FuseCareError(f"{what} folder {folder} is the input folder {path} or inside it: "
                                "refusing, it would overwrite or mix with the inputs; choose another folder")
        if not path.is_dir() and folder.resolve() == path.parent.resolve():
            raise FuseCareError(f"{what} folder {folder} holds the input {path}: refusing, its output would "
                                "replace it; choose another folder")


def restore_paths(inputs: Sequence[str | Path], output_dir: str | Path, weights_dir: str | Path,
                  options: RestoreOptions = RestoreOptions()) -> list[CaseOutcome]:
    """Restore ``inputs`` (.tif/.tiff files, or folders of them) into ``output_dir``, each output
    named as its input. ``InputError`` for a folder with no case; ``FuseCareError`` for an output
    folder that would overwrite an input, or two inputs of the same name (one output would
    silently replace the other)."""
    paths, output_dir = [Path(p) for p in inputs], Path(output_dir)
    for folder, what in ((output_dir, "output"), (options.uncertainty_dir, "uncertainty")):
        _refuse_overwriting(folder, what, paths)
    cases = [case for path in paths for case in (list_cases(path) if path.is_dir() else [path])]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.name in seen and seen[case.name].absolute() != case.absolute():
            raise FuseCareError(f"two inputs named {case.name} ({seen[case.name]} and {case}): their outputs "
                                "would have the same name; restore them into separate folders")
        seen.setdefault(case.name, case)
    cases = list({case.absolute(): case for case in cases}.values())  # a file given twice runs once
    for folder in (output_dir, options.uncertainty_dir):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FuseCareError(f"cannot create output folder {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise FuseCareError(f"output folder {folder} is not writable")
        for stale in stale_partials(folder):
            try:
                stale.unlink()
                log.warning("removed %s, a temporary file an interrupted run left in %s", stale.name, folder)
            except OSError as exc:
                log.warning("cannot remove %s, a temporary file an interrupted run left: %s", stale, exc.strerror)
    ensembles = EnsembleCache(Path(weights_dir), inference_device(options.device), fp16=options.fp16)
    log.info("%d case(s) in %s -> %s (device %s)", len(cases), ", ".join(map(str, paths)), output_dir,
             ensembles.device)
    return [restore_case(p, output_dir, ensembles, options) for p in cases]


# --------------------------------------------------------------------------- arrays in memory


def restore_array(volume: np.ndarray, *, channel: str = MEMBRANE,
                  voxel_size: Sequence[float] | None = None, weights: str | Path | None = None,
                  device: str = "auto", uncertainty: bool = False, gate: bool = True,
                  tile: tuple[int, int, int] | None = None, progress: bool = False,
                  attenuation_correction: bool = True, light_from: str | None = None,
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One ZYX volume restored as the command line restores a file (``fusecare.restore``).

    The same path as ``restore_case`` minus the files: non-finite voxels repaired, extreme floats
    rescaled, the channel's ensemble (found by ``fusecare.restoration.weights.find_weights``), the calibrated
    gate, uint16 out. A gate that is input-only returns the input
    as uint16 with one ERROR line, as the command line's fallback does; any other failure raises,
    since a caller holding an array can decide better than a blanket fallback. ``voxel_size``
    (z, y, x) in um is checked and logged: the network works in voxels, trained at the
    challenge's sampling. With ``uncertainty`` the members' own spread (uint16, unit
    ``UNCERTAINTY_UNIT``) comes second. ``attenuation_correction`` and ``light_from`` are
    ``RestoreOptions``' (``--no-attenuation-correction``, ``--light-from``).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(f"expected a 3-D ZYX volume, got shape {volume.shape}")
    if channel not in CHANNELS:
        raise InputError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    size = VoxelSize()
    if voxel_size is not None:
        values = tuple(float(v) for v in voxel_size)
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise InputError(f"voxel_size must be three positive numbers (z, y, x) in um, got {voxel_size!r}")
        size = VoxelSize(*values)
    from fusecare.restoration.weights import find_weights

    ensembles = EnsembleCache(find_weights(weights), inference_device(device))
    options = RestoreOptions(tile=tile, device=device, gate=gate, progress=progress, time_budget=None,
                             attenuation_correction=attenuation_correction, light_from=light_from)
    volume = rescale_float(replace_non_finite(volume, "volume"), "volume")
    meta = CaseMeta(voxel_size=size, channel=channel)
    try:
        restored = _predict_case(volume, meta, ensembles, options, "volume", with_uncertainty=uncertainty)
    except InputOnlyGateError as exc:
        log.error("volume FALLBACK, returning the input unchanged (scores N-SSIM 0): %s", exc)
        if not uncertainty:
            return input_as_uint16(volume)
        spread = _predict_case(volume, meta, ensembles, dataclasses.replace(options, gate=False), "volume",
                               with_uncertainty=True)
        return input_as_uint16(volume), spread.uncertainty  # type: ignore[return-value]
    if uncertainty:
        return restored.output, restored.uncertainty  # type: ignore[return-value]
    return restored.output

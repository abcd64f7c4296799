"""Export an ensemble as a BioImage Model Zoo package, so it runs in Fiji, ilastik, BiaPy or napari.

    python -m fusecare.export bioimageio --channel membrane -o DIR [--weights model_weights] [--overwrite]

One zip per channel, ``DIR/fusecare-<channel>.zip``, built and validated with ``bioimageio.spec``
(format 0.5) and, unless ``--no-test``, tested with ``bioimageio.core``'s ``test_model``:

- the model is the ensemble's mean as ONE module (``fusecare/export/zoo_arch.py``'s ``EnsembleMean``,
  shipped in the package: members inside, their mean out), as ``pytorch_state_dict`` and
  ``torchscript`` weights. It is **ungated**: fusecare's do-no-harm gate (Gaussian smoothing,
  a pull toward the input where members disagree) and its attenuation correction (a
  whole-volume pass, ``fusecare.restoration.attenuation``) are not in the package;
- input and output axes ``batch, channel, z, y, x``; input sizes ``min + n * 2**depth`` along z,
  y, x; the output's halo is the receptive field rounded up to the alignment (``Ensemble.margin``),
  so tiling consumers crop what the network could not see;
- preprocessing ``scale_range`` with percentiles 2 and 99.8 per sample over z, y, x (the
  challenge's normalisation); the output stays in those normalised units (bioimageio.core pads
  by the halo before it takes the percentiles: a small difference to fusecare, see the tests);
- test input: the bundled sample of the channel (or a phantom), reflect-padded to a valid size;
  test output computed by fusecare itself (``PercentileNorm`` then ``Ensemble.predict_block``);
- a cover image, and documentation with the model card's validation numbers, the training-data
  statement, licence, authors and the CARE citation.

Nothing is left behind on failure: the zip is written under a temporary name and renamed last.
Exit status 0, 1 when the written package fails ``test_model`` (it is removed), 2 for bad input.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusecare.errors import ExportError
from fusecare.normalize import FMC_PERCENTILES, PercentileNorm
from fusecare.restoration.ensemble import Ensemble, load_ensemble
from fusecare.restoration.model import ModelConfig
from fusecare.restoration.tiling import WHOLE_VOLUME, predict_normalised

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
MODEL_CARD = REPO / "MODEL_CARD.md"
SAMPLES = REPO / "samples" / "input"
ARCHITECTURE = Path(__file__).with_name("zoo_arch.py")

EXPRESSIBLE_FIELDS: tuple[str, ...] = (
    "depth", "first_filters", "kernel_size", "convs_per_level", "residual", "probabilistic", "base_sigma")
"""ModelConfig fields ``zoo_arch.CareUNet3D`` takes as keyword arguments; any other field (but
``axes == 'ZYX'``) means the member cannot be rebuilt from the shipped architecture file."""

CARE_CITATION = ("Weigert et al. (2018): Content-aware image restoration: pushing the limits of "
                 "fluorescence microscopy. Nature Methods 15, 1090-1097")
CARE_DOI = "10.1038/s41592-018-0216-7"
TRAINING_DATA = (
    "The shipped weights were NOT trained on Fuse My Cells challenge data: they were trained on "
    "single-view / fused pairs simulated (fusecare/training/simulate.py) from four small real clean volumes "
    "(PlantSeg test resources, MIT licence) and synthetic phantoms. Retrain on real pairs for real use."
)


def package_name(channel: str) -> str:
    return f"fusecare-{channel}.zip"


# --------------------------------------------------------------------------- the module


def member_kwargs(config: ModelConfig, name: str = "member") -> dict[str, Any]:
    """``CareUNet3D`` keyword arguments for one member, or ExportError naming what does not fit."""
    fields = config.to_dict()
    if fields.get("axes", "ZYX") != "ZYX":
        raise ExportError(f"{name}: axes {fields['axes']!r} cannot be expressed in the package (only ZYX)")
    if fields.pop("corrected_input", False):
        raise ExportError(f"{name}: reads the view times its attenuation field (config field 'corrected_input'), "
                          "which fusecare estimates on the whole view; a model-zoo runner would feed it the view "
                          "itself: run it with fusecare predict instead")
    extra = sorted(set(fields) - set(EXPRESSIBLE_FIELDS) - {"axes"})
    if extra:
        raise ExportError(f"{name}: config field {extra[0]!r} cannot be expressed in the package "
                          f"(zoo_arch.CareUNet3D takes {', '.join(EXPRESSIBLE_FIELDS)})")
    return {key: fields[key] for key in EXPRESSIBLE_FIELDS if key in fields}


def ensemble_module(ensemble: Ensemble) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The members as one ``zoo_arch.EnsembleMean`` (weights copied), with its constructor kwargs."""
    from fusecare.export import zoo_arch

    kwargs = [member_kwargs(m.config, f"member_{k}") for k, m in enumerate(ensemble.members)]
    module = zoo_arch.EnsembleMean(kwargs)
    for target, member in zip(module.members, ensemble.members):
        state = {k: v.detach().cpu().contiguous() for k, v in member.state_dict().items()}
        target.load_state_dict(state, strict=True)
    return module.eval(), kwargs


# --------------------------------------------------------------------------- tensors


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def min_size(ensemble: Ensemble) -> int:
    """Smallest input side: two halos plus one aligned block of output that saw full context."""
    return 2 * ensemble.margin + ensemble.alignment


def test_input(channel: str, ensemble: Ensemble, sample: Path | None = None) -> np.ndarray:
    """(Z, Y, X) float32: the bundled sample of ``channel`` (a phantom when absent), reflect-padded
    to a valid input size (at least ``min_size``, multiples of the alignment)."""
    import tifffile

    path = sample if sample is not None else SAMPLES / f"sample_{channel}.tif"
    if path.is_file():
        volume = np.asarray(tifffile.imread(path), dtype=np.float32).squeeze()
        if volume.ndim != 3:
            raise ExportError(f"test input {path} is not a 3-D volume (shape {volume.shape})")
    else:
        from fusecare.training.phantoms import membrane_phantom, nuclei_phantom

        log.warning("no sample %s: the test input is a synthetic phantom", path)
        make = membrane_phantom if channel == "membrane" else nuclei_phantom
        volume = (1000.0 * make((32, 64, 64), rng=np.random.default_rng(0)) + 100.0).astype(np.float32)
    low = min_size(ensemble)
    shape = [max(low, round_up(n, ensemble.alignment)) for n in volume.shape]
    pads = [(0, n - m) for n, m in zip(shape, volume.shape)]
    # reflect needs pad < size: repeat until done (a 32-slice volume padded to 52 or more)
    while any(after for _, after in pads):
        step = [(0, min(after, m - 1)) for (_, after), m in zip(pads, volume.shape)]
        volume = np.pad(volume, step, mode="reflect")
        pads = [(0, n - m) for n, m in zip(shape, volume.shape)]
    return np.ascontiguousarray(volume, dtype=np.float32)


def test_output(ensemble: Ensemble, volume: np.ndarray) -> np.ndarray:
    """fusecare's own ungated prediction of ``volume``: challenge normalisation, member mean, in
    one block as the model zoo's runner predicts it (``volume`` is ``test_input``, already aligned)."""
    mean_spread = predict_normalised(volume, ensemble.predict_block, margin=ensemble.margin,
                                     align=ensemble.alignment, tile=WHOLE_VOLUME)
    return mean_spread[0]  # type: ignore[index]


# --------------------------------------------------------------------------- documents


def validation_section(channel: str, model_card: Path | None) -> str:
    """The model card's quality numbers for ``channel`` (quoted, not recomputed), or a note."""
    if model_card is None or not model_card.is_file():
        return ("No validation numbers are on record for this ensemble (not the shipped weights, "
                "or no model card given); evaluate it with `evaluation/score.py` before use.\n")
    text = model_card.read_text()
    blocks = re.findall(r"^## Quality[^\n]*\n(.*?)(?=^## )", text, flags=re.S | re.M)
    rows = [line for line in (blocks[0].splitlines() if blocks else []) if line.startswith("|")]
    lines = rows[:2] + [line for line in rows[2:] if line.split("|")[1].strip() == channel]
    if len(lines) <= 2:
        return f"See the model card ({model_card.name}) of fusecare for validation numbers.\n"
    return (
        f"Quoted from fusecare's {model_card.name} (`python bench/quality.py`, CPU): mean N-SSIM (worst case "
        "in brackets), the challenge's normalised SSIM gain over the input (0 = as good as the input), on "
        "single views simulated from volumes never used in training (held-out), from training volumes "
        "(seen) and from phantoms, against a simulated dual-view fused target (`fused`) or the clean "
        "volume (`clean`). `ensemble` is what this package computes (ungated); `gated` is "
        "fusecare's own inference with its safety net, which the package does not contain.\n\n"
        + "\n".join(lines) + "\n"
    )


def documentation(channel: str, ensemble: Ensemble, model_card: Path | None) -> str:
    members = len(ensemble.members)
    config = ensemble.members[0].config
    return f"""# fusecare CARE ensemble: {channel}

Restores a single-view 3-D lightsheet volume ({channel} stain) towards the quality of a multi-view
fused one (the Fuse My Cells challenge task), with an ensemble of {members} CARE 3-D U-Nets
(depth {config.depth}, {config.first_filters} first-level filters, residual). The model is the
members' mean, computed inside one PyTorch module.

## Input and output

- Input: one volume, axes `batch, channel, z, y, x`, one channel; z, y and x of at least
  {min_size(ensemble)} and multiples of {ensemble.alignment}. Preprocessing: percentile scaling
  per sample (2nd percentile -> 0, 99.8th -> 1, over z, y, x), the challenge's normalisation.
- Output: the restored volume in the same normalised units (not mapped back to the input's
  intensities). A halo of {ensemble.margin} voxels per side (the receptive field) is cropped
  by tiling consumers.
- bioimageio.core pads the input by the halo (symmetric) before it takes the percentiles, so its
  normalisation (and output) differs slightly from fusecare's, which takes them on the volume
  itself (about 1e-3 normalised units on a test volume); the network part agrees to 1e-4.

## Ungated

fusecare's own inference applies a do-no-harm gate after the mean (Gaussian smoothing and a pull
toward the normalised input where the members disagree, calibrated on validation cases), and the
shipped gates then brighten the single view's far side by an attenuation field estimated from the
whole volume. Neither is in this package: it predicts the plain ensemble mean of each tile.
Where a calibration gates a channel off (an input-only gate), this package still runs the network.

## Validation

{validation_section(channel, model_card)}
## Training data

{TRAINING_DATA}

## Licence, authors, citation

BSD-3-Clause, fusecare developers. Please cite CARE: {CARE_CITATION}, doi:{CARE_DOI}.
"""


def cover_image(path: Path, volume: np.ndarray, restored: np.ndarray) -> Path:
    """A 2:1 PNG: maximum projection along z of the normalised test input beside its restoration."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [PercentileNorm.fit(volume).forward(volume).max(axis=0), restored.max(axis=0)]
    low, high = np.percentile(shown[1], [0.5, 99.9])
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    for ax, image, title in zip(axes, shown, ("single view (input)", "restored (this model)")):
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(title, fontsize=14)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the package


def build_description(channel: str, ensemble: Ensemble, work: Path, *, model_card: Path | None,
                      sample: Path | None = None) -> Any:
    """Write the package's files under ``work`` and return the validated v0.5 ``ModelDescr``."""
    from bioimageio.spec.model import v0_5 as bio

    module, kwargs = ensemble_module(ensemble)
    volume = test_input(channel, ensemble, sample)
    restored = test_output(ensemble, volume)
    np.save(work / "test_input.npy", volume[None, None])
    np.save(work / "test_output.npy", restored[None, None])
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    torch.save(state, work / "weights.pt")
    with torch.no_grad():  # traced, not scripted: TorchScript cannot walk the decoders backwards
        traced = torch.jit.trace(module, torch.from_numpy(restored[None, None]), check_trace=False)
    traced.save(str(work / "weights_torchscript.pt"))
    shutil.copyfile(ARCHITECTURE, work / ARCHITECTURE.name)
    cover_image(work / "cover.png", volume, restored)
    (work / "README.md").write_text(documentation(channel, ensemble, model_card))

    torch_version = bio.Version(torch.__version__.split("+")[0])
    spatial = ("z", "y", "x")
    size = bio.ParameterizedSize(min=min_size(ensemble), step=ensemble.alignment)
    inputs = bio.InputTensorDescr(
        id=bio.TensorId("raw"), description=f"single-view {channel} volume",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(channel)])]
        + [bio.SpaceInputAxis(id=bio.AxisId(a), size=size) for a in spatial],
        test_tensor=bio.FileDescr(source=work / "test_input.npy"),
        preprocessing=[bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
            axes=[bio.AxisId(a) for a in spatial],
            min_percentile=FMC_PERCENTILES[0], max_percentile=FMC_PERCENTILES[1]))],
    )
    outputs = bio.OutputTensorDescr(
        id=bio.TensorId("restored"), description="ensemble mean, in the input's normalised units",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(channel)])]
        + [bio.SpaceOutputAxisWithHalo(id=bio.AxisId(a), halo=ensemble.margin,
                                       size=bio.SizeReference(tensor_id=bio.TensorId("raw"), axis_id=bio.AxisId(a)))
           for a in spatial],
        test_tensor=bio.FileDescr(source=work / "test_output.npy"),
    )
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=work / "weights.pt", pytorch_version=torch_version,
            architecture=bio.ArchitectureFromFileDescr(
                source=work / ARCHITECTURE.name, callable=bio.Identifier("EnsembleMean"),
                kwargs={"members": kwargs})),
        torchscript=bio.TorchscriptWeightsDescr(
            source=work / "weights_torchscript.pt", pytorch_version=torch_version, parent="pytorch_state_dict"),
    )
    return bio.ModelDescr(
        name=f"fusecare CARE ensemble {channel}",
        description=(f"Single-view to fused-quality restoration of 3-D lightsheet {channel} volumes: "
                     f"mean of {len(ensemble.members)} CARE 3-D U-Nets (ungated). Trained on simulated pairs."),
        authors=[bio.Author(name="fusecare developers")],
        cite=[bio.CiteEntry(text=CARE_CITATION, doi=bio.Doi(CARE_DOI))],
        license=bio.LicenseId("BSD-3-Clause"),
        documentation=bio.FileDescr(source=work / "README.md"),
        covers=[bio.FileDescr(source=work / "cover.png")],
        tags=["3d", "lightsheet", "restoration", "denoising", "care", "unet", "pytorch", channel, "fuse-my-cells"],
        inputs=[inputs], outputs=[outputs], weights=weights,
    )


def check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} exists and is not empty (use --overwrite to write into it)")


def export_bioimageio(channel: str, weights: Path, out: Path, *, overwrite: bool = False, test: bool = True,
                      model_card: Path | None = None, sample: Path | None = None) -> Path:
    """Write ``out/fusecare-<channel>.zip``; on any failure nothing new is left in ``out``."""
    from bioimageio.spec import save_bioimageio_package

    check_output_folder(out, overwrite)
    folder = weights / channel
    if not folder.is_dir():
        raise ExportError(f"no weights for channel {channel!r} (no folder {folder})")
    ensemble = load_ensemble(folder, device="cpu", channels_last=False)
    if ensemble.gate is not None:
        log.info("%s: the manifest's gate is not packaged (the package predicts the ungated mean)", channel)
    started = time.perf_counter()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    final = out / package_name(channel)
    partial = out / f".{final.name}.partial.zip"
    try:
        with tempfile.TemporaryDirectory(prefix="fusecare-export-") as tmp:
            descr = build_description(channel, ensemble, Path(tmp), model_card=model_card, sample=sample)
            save_bioimageio_package(descr, output_path=partial)
        if test:
            failure = test_package(partial)
            if failure:
                raise ExportError(f"{channel}: the package failed bioimageio.core's test_model: {failure}")
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    log.info("wrote %s (%.1f MB) in %.1f s", final, final.stat().st_size / 1e6, time.perf_counter() - started)
    return final


def test_package(path: Path) -> str | None:
    """Run ``bioimageio.core.test_model``; None when it passed, else its first error in one line."""
    from bioimageio.core import test_model

    summary = test_model(path)
    if summary.status == "passed":
        return None
    errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
    return (errors[0] if errors else summary.status).splitlines()[0]


# --------------------------------------------------------------------------- command line


def _quiet_bioimageio(debug: bool) -> None:
    """bioimageio logs through loguru at INFO; keep stderr to our own lines unless --debug."""
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover - a dependency of bioimageio.spec
        return
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if debug else "ERROR")

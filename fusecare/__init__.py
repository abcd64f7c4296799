"""fusecare: fused-quality lightsheet volumes from a single view with a CARE 3-D U-Net ensemble.

Two calls for arrays in memory (the command line is ``fusecare``, see ``fusecare.cli``)::

    import fusecare, tifffile
    volume = tifffile.imread("samples/input/sample_membrane.tif")        # ZYX
    restored = fusecare.restore(volume, channel="membrane")             # uint16, same shape
    scores = fusecare.score(restored, target, volume, channel="membrane")  # {"n_ssim": ...}

Importing the package is cheap (standard library only): numpy and torch load at the first call,
so the command line's ``--help`` and usage errors answer in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__version__ = "0.1.0"
__all__ = ["__version__", "restore", "score"]


def restore(volume: np.ndarray, channel: str = "membrane", voxel_size: Sequence[float] | None = None,
            weights: str | Path | None = None, device: str = "auto", uncertainty: bool = False,
            **options: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Restore one single-view ZYX volume with the channel's ensemble, as ``fusecare predict`` does.

    ``volume``: any real dtype, 3-D (Z, Y, X). ``channel``: ``"membrane"`` or ``"nucleus"``.
    ``voxel_size``: (z, y, x) in micrometres, optional (checked and logged; the network works
    in voxels). ``weights``: a folder with one ensemble per channel; default by the lookup order
    of ``fusecare.restoration.weights`` (``FUSECARE_WEIGHTS``, the checkout's ``model_weights/``, the copy
    installed with the package). ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns uint16 of the volume's shape, on the input's intensity scale (the command line's
    dtype policy); with ``uncertainty=True`` a pair (output, members' spread as uint16 in units of
    1e-4 normalised intensity). Further keywords (``gate``, ``tile``, ``progress``,
    ``attenuation_correction``, ``light_from``: e.g. ``"x start"``, the light sheet's entry face) go to
    ``fusecare.restoration.pipeline.restore_array``. An ensemble whose calibrated gate is input-only
    returns the input as uint16, with one ERROR line; other failures raise
    ``fusecare.errors.FuseCareError`` subclasses.
    """
    from fusecare.restoration.pipeline import restore_array

    return restore_array(volume, channel=channel, voxel_size=voxel_size, weights=weights, device=device,
                         uncertainty=uncertainty, **options)


def score(pred: np.ndarray, gt: np.ndarray, inp: np.ndarray, channel: str = "membrane",
          voxel_size: Sequence[float] = (1.0, 1.0, 1.0), segment: bool = False, **options: Any) -> dict[str, Any]:
    """The challenge's scores of one case, as ``fusecare score`` computes them per case.

    ``pred``, ``gt`` (the fused target) and ``inp`` (the single view) are ZYX arrays of one shape.
    Returns ``{"ssim_input", "ssim_pred", "n_ssim"}``, plus ``{"iou_input", "iou_pred", "n_iou"}``
    with ``segment=True`` (cellpose 3, slow on CPU; ``voxel_size`` (z, y, x) um matters only
    then). Further keywords are ``fusecare.scoring.evaluate.EvalOptions`` fields (``ssim``, ``seg``,
    ``device``, ``cellpose_models``, ``allow_download``).
    """
    import dataclasses

    import numpy as np

    from fusecare.errors import InputError
    from fusecare.scoring.evaluate import EvalOptions, score_volumes

    arrays = [np.asarray(v) for v in (gt, pred, inp)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 3:
        raise InputError(f"pred, gt and inp must be 3-D of one shape, got {[a.shape for a in arrays]}")
    ssim, seg = score_volumes(*arrays, channel=channel, voxel_size=tuple(voxel_size),
                              options=EvalOptions(segment=segment, progress=False, **options))
    scores = dataclasses.asdict(ssim)
    if seg is not None:
        scores.update(dataclasses.asdict(seg))
    return scores

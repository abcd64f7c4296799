"""Names and defaults the command line needs before any heavy module is imported.

They live here, beside nothing that imports numpy or torch, so that ``fusecare --help`` and every
usage error answer in a fraction of a second; the modules that use them import them from here.
"""

from __future__ import annotations

TIFF_SUFFIXES = (".tif", ".tiff")
NUCLEUS, MEMBRANE = "nucleus", "membrane"
CHANNELS = (NUCLEUS, MEMBRANE)

ILLUMINATION_FACES = ("y start", "y end", "x start", "x end")
"""Where a light sheet may enter a volume: the start (index 0) or end of its Y or X axis
(``fusecare predict --light-from``, ``restoration.attenuation``)."""

DEFAULT_TILE = {"cuda": (96, 256, 256), "cpu": (64, 128, 128)}
"""Tile (Z, Y, X) per device type, the one default (``fusecare predict``, the restoration pipeline
and training's validation and calibration read it from here). On CPU, cases choose a larger one
where memory allows (``restoration.planning.cpu_tile``: 6 B/voxel + 1.5 GB), this one being the
smallest. The CUDA one awaits a GPU run (scripts/gpu_check.py, README)."""

DEFAULT_TIME_BUDGET = 480.0
"""Seconds per case from its start (reading, percentiles, prediction) to the last tile. The
challenge kills a container after 10 minutes per case including its start and model loading, and
a killed case scores below its own input; 480 s leaves 120 s for those and for writing the output
(about 10 s for the largest case, 2.3 GB of uint16)."""

UNCERTAINTY_UNIT = 1e-4
"""Uncertainty maps are uint16 in steps of 1e-4 normalised intensity (p2 -> 0, p99.8 -> 1): what
restoration writes and what the figures read back."""

IOU_MODES: tuple[str, ...] = ("foreground", "instance")
MODELS_ENV = "CELLPOSE_LOCAL_MODELS_PATH"

"""Shared fixtures. Tests never touch the network and never need ../shared to pass."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def linter(name: str) -> str:
    """The linter's path: on PATH, or beside this Python (a venv run as ``.venv/bin/python -m
    pytest`` without activating it keeps its console scripts off PATH); skip when absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} not installed (pip install -r requirements-dev.txt installs it)")
    return found


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def shared_data() -> Path:
    """The real volumes in ../shared/data, or a skip with the reason when they are absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real volumes not found at {SHARED_DATA} (only on development machines and CI)")
    return SHARED_DATA


def _off_cuda(value: object) -> object:
    """A CUDA device (or its name) as the CPU; anything else unchanged."""
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    import torch

    return torch.device("cpu") if isinstance(value, torch.device) and value.type == "cuda" else value


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA reported available, while tensors and modules sent to it stay on the CPU.

    Runs the CUDA branches (the device ``auto`` picks, the tile defaults, the fp16 switch, the
    SSIM's GPU tiling) on machines without a GPU, which CI has; what a real GPU computes is left to
    the tests that skip without one.
    """
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cls in (torch.Tensor, torch.nn.Module):
        def to(self, *args, _real=cls.to, **kwargs):
            return _real(self, *map(_off_cuda, args), **{k: _off_cuda(v) for k, v in kwargs.items()})
        monkeypatch.setattr(cls, "to", to)


def make_tiny_ensemble(root: Path, channel: str, *, members: int = 2, probabilistic: bool = False,
                       first_filters: int = 4, gate_scale: float | None = None,
                       corrected_input: bool = False) -> Path:
    """A randomly initialised ensemble folder (fast, for wiring tests; not a trained model)."""
    import torch

    from fusecare.restoration.ensemble import save_member, write_manifest
    from fusecare.restoration.gate import GateConfig
    from fusecare.restoration.model import CareUNet, ModelConfig

    folder = root / channel
    for k in range(members):
        torch.manual_seed(k)
        model = CareUNet(ModelConfig(first_filters=first_filters, probabilistic=probabilistic,
                                     corrected_input=corrected_input))
        save_member(folder / f"member_{k}", model)
    gate = GateConfig(spread_scale=gate_scale) if gate_scale is not None else None
    write_manifest(folder, channel, gate=gate)
    return folder


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A weights folder with tiny random ensembles for both channels."""
    root = tmp_path / "weights"
    for channel in ("nucleus", "membrane"):
        make_tiny_ensemble(root, channel)
    return root


def write_fmc_tif(path: Path, volume: np.ndarray, **metadata: object) -> Path:
    """Write a volume the way Fuse My Cells inputs come: shaped JSON metadata."""
    import tifffile

    md = {"PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 1.0, "unit": "micron",
          "axes": "ZYX", "channel": "nucleus", "study": 1}
    md.update(metadata)
    md = {k: v for k, v in md.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, volume, metadata=md, photometric="minisblack")
    return path


# --------------------------------------------------------------------------- test levels

LEVELS: dict[str, str] = {
    # e2e: a command run as a user runs it (subprocesses, the container contract, shipped weights)
    "test_cli": "e2e", "test_container": "e2e", "test_fuzz": "e2e", "test_gpu_check": "e2e",
    "test_inference": "e2e", "test_model_weights": "e2e", "test_lint": "e2e",
    "test_reproduce_shipped": "e2e", "test_train_generalise": "e2e",
    # integration: several modules together (a case end to end in memory, training, scoring, export)
    "test_calibration": "integration", "test_pairs": "integration", "test_ensemble": "integration",
    "test_evaluate": "integration", "test_bioimageio": "integration", "test_report": "integration",
    "test_pipeline": "integration", "test_pacing": "integration", "test_segment": "integration",
    "test_training": "integration", "test_benchmarks": "integration",
}
"""Test module (file name, unique across folders) -> level; every other module is ``unit`` (one
module, small arrays, no subprocess). Folders mirror the package (``tests/restoration/`` tests
``fusecare/restoration/``; the ground floor and the commands run as a user sit in ``tests/``), so
levels are markers: select one with ``-m unit``, ``-m integration`` or ``-m e2e`` (and
``-m "not slow"`` for the README's default)."""


def blob_specimen(rng: np.random.Generator, shape: tuple[int, int, int] = (24, 96, 96),
                  border: tuple[int, int, int] = (2, 8, 8)) -> np.ndarray:
    """Bright blobs of similar brightness filling a box ``border`` voxels inside each face: a
    specimen (float32, 0 outside) whose own brightness has no trend along any axis."""
    blobs = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), (1.0, 2.0, 2.0))
    blobs = np.clip((blobs - blobs.mean()) / blobs.std(), 0, None)
    box = np.zeros(shape, dtype=np.float32)
    box[tuple(slice(b, n - b) for b, n in zip(border, shape))] = 1.0
    return (blobs * box).astype(np.float32)


def beer_lambert(signal: np.ndarray, axis: int, from_start: bool, rate: float, step_um: float) -> np.ndarray:
    """``signal`` dimmed by Beer-Lambert (``rate`` per um) along ``axis`` from one face, through
    the specimen (its smoothed support is the density), as the simulator renders a single view."""
    from fusecare.optics import path_length_um

    density = ndimage.gaussian_filter((signal > 0).astype(np.float32), 2.0)
    return (signal * np.exp(-rate * path_length_um(density, axis, from_start, step_um))).astype(np.float32)


class FakeClock:
    """Time that passes only when a fake predictor says so: budget tests without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def slow_predictor(clock: FakeClock, seconds: float, offset: float):
    """A predictor (mean ``x + offset``, spread 0) that advances ``clock`` by ``seconds`` per block."""
    def predict(x: np.ndarray) -> np.ndarray:
        clock.now += seconds
        return np.stack([x + offset, np.zeros_like(x)])
    return predict


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its module's level (``LEVELS``)."""
    for item in items:
        item.add_marker(getattr(pytest.mark, LEVELS.get(item.path.stem, "unit")))

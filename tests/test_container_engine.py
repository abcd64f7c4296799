"""The container scripts under Docker or Podman, the image's own requirements, the CPU build
argument, and (where Podman and a built image are at hand) the image run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_container import dockerfile_instructions

FAKE_ENGINE = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$FAKE_ENGINE_LOG"
if [[ "$1" == info ]]; then exit "${FAKE_INFO_STATUS:-0}"; fi
exit 0
"""


@pytest.fixture
def engines(tmp_path, monkeypatch) -> Path:
    """Fake ``docker`` and ``podman`` first on PATH (each logs its arguments), only those two."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman"):
        (bin_dir / name).write_text(FAKE_ENGINE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    monkeypatch.setenv("ALLOW_NO_WEIGHTS", "1")
    for name in ("CONTAINER_ENGINE", "PODMAN_FLAGS", "CONTAINER_ULIMITS", "CONTAINER_BUILD_NETWORK", "WHEELS"):
        monkeypatch.delenv(name, raising=False)
    return log


def _build(log: Path, **env: str) -> list[str]:
    result = subprocess.run([str(REPO / "scripts" / "docker_build.sh"), "img:t"], capture_output=True,
                            text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return [line for line in log.read_text().splitlines() if " build " in f" {line} "]


def test_podman_gets_runc_vfs_and_lowered_ulimits(engines):
    [build] = _build(engines, CONTAINER_ENGINE="podman", CONTAINER_BUILD_NETWORK="none")
    assert build == ("podman --runtime runc --storage-driver vfs build --ulimit nofile=1024:1024 "
                     "--ulimit nproc=1024:1024 --network none --tag img:t .")


def test_docker_is_called_as_before(engines):
    [build] = _build(engines, CONTAINER_ENGINE="docker")
    assert build == "docker build --tag img:t ."


def test_auto_detection_prefers_a_docker_whose_daemon_answers(engines):
    assert _build(engines)[0].startswith("docker build")
    engines.unlink()
    assert _build(engines, FAKE_INFO_STATUS="1")[0].startswith("podman --runtime runc")


def test_podman_flags_and_ulimits_can_be_overridden(engines):
    [build] = _build(engines, CONTAINER_ENGINE="podman", PODMAN_FLAGS="", CONTAINER_ULIMITS="nofile=512:512")
    assert build == "podman build --ulimit nofile=512:512 --tag img:t ."


def test_export_with_podman_writes_a_docker_archive(engines, tmp_path):
    result = subprocess.run([str(REPO / "scripts" / "docker_export.sh"), "img:t", str(tmp_path / "x.tar.gz")],
                            capture_output=True, text=True, env={**os.environ, "CONTAINER_ENGINE": "podman"})
    assert result.returncode == 0, result.stderr
    assert "podman --runtime runc --storage-driver vfs save --format docker-archive img:t" in engines.read_text()


# --------------------------------------------------------------------------- what the image installs


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_image_requirements_are_inference_only_and_pinned_as_for_development():
    image, dev = _lines(REPO / "requirements-image.txt"), _lines(REPO / "requirements.txt")
    assert set(image) <= set(dev)  # the same pins, so tests here cover what the image runs
    names = {re.split(r"[=<>!~\[; ]", line)[0].lower() for line in image}
    assert {"torch", "numpy", "scipy", "tifffile", "imagecodecs", "tqdm"} <= names
    assert not names & {"matplotlib", "cellpose", "bioimageio.core", "bioimageio.spec", "pydantic",
                        "scikit-image", "simpleitk"}


def test_inference_imports_nothing_outside_the_image_requirements(tmp_path):
    """Run inference on a sample and list the third-party packages it imported."""
    code = f"""
import runpy, sys
sys.argv = ["inference.py", "--input", {str(REPO / 'samples' / 'input')!r}, "--output", {str(tmp_path / 'out')!r},
            "--device", "cpu"]
try:
    runpy.run_path("inference.py", run_name="__main__")
except SystemExit:
    pass
print("MODULES", " ".join(sorted({{m.split(".")[0] for m in sys.modules}})))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("MODULES ")]
    imported = set(line.split()[1:])
    outside = {"matplotlib", "cellpose", "bioimageio", "skimage", "SimpleITK", "PIL", "pydantic"}
    assert not imported & outside, imported & outside


def test_dockerfile_demands_cuda12_torch_by_default_and_takes_a_cpu_base_by_argument():
    instructions = dockerfile_instructions((REPO / "Dockerfile").read_text())
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)
    assert args["TORCH"] == "cuda12"
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:2.")
    [pip_run] = [value for kind, value in instructions if kind == "RUN" and "pip install" in value]
    assert "--mount=type=bind,source=wheels" in pip_run  # the wheelhouse never becomes a layer
    assert "cuda.startswith('12.')" in pip_run and "torch.version.cuda is None" in pip_run
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "!wheels/" in dockerignore and "!requirements-image.txt" in dockerignore


# --------------------------------------------------------------------------- the image, for real


def _podman_image(image: str) -> str | None:
    """None when ``image`` can be run with podman here, else why not."""
    if shutil.which("podman") is None:
        return "podman not installed (apt-get install podman runc)"
    flags = os.environ.get("PODMAN_FLAGS", "--runtime runc --storage-driver vfs").split()
    found = subprocess.run(["podman", *flags, "image", "exists", image], capture_output=True)
    if found.returncode != 0:
        return (f"image {image} not built with podman here (scripts/make_cpu_base.sh, then WHEELS=1 "
                "scripts/docker_build.sh fusecare:cpu --build-arg BASE_IMAGE=fusecare-base:cpu "
                "--build-arg TORCH=cpu)")
    return None


@pytest.mark.slow
def test_the_built_image_runs_samples_and_bad_inputs_like_the_organisers():
    """scripts/container_check.sh under podman (about 4 min on 2 cores with vfs storage)."""
    image = os.environ.get("FUSECARE_IMAGE", "fusecare:cpu")
    reason = _podman_image(image)
    if reason:
        pytest.skip(reason)
    result = subprocess.run([str(REPO / "scripts" / "container_check.sh"), image], capture_output=True,
                            text=True, timeout=1800, env={**os.environ, "CONTAINER_ENGINE": "podman"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "PASS: the image runs the samples and survives bad inputs" in result.stdout
    assert "FAIL " not in result.stdout


# --------------------------------------------------------------------------- the oldest torch allowed


OLD_TORCH_CODE = """
import json, sys
from pathlib import Path
import numpy as np, torch
assert torch.__version__.startswith("2.1."), torch.__version__
repo, out, *paths = sys.argv[1:]
for path in paths:
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)] if isinstance(state, dict) else []
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
sys.path.insert(0, repo)
from fusecare.restoration.ensemble import load_ensemble
x = np.random.default_rng(0).standard_normal((16, 64, 64)).astype(np.float32)
channels = sorted(p.name for p in (Path(repo) / "model_weights").iterdir() if (p / "manifest.json").is_file())
np.savez(out, **{c: load_ensemble(Path(repo) / "model_weights" / c).predict_block(x) for c in channels})
print(json.dumps({"torch": torch.__version__, "loaded": len(paths), "channels": channels}))
"""


def test_weights_saved_here_load_in_the_oldest_torch_the_dockerfile_allows(tmp_path):
    """The Dockerfile takes any torch 2.x for CUDA 12: the oldest is 2.1. In a Python with torch
    2.1 and the image's other requirements, every shipped member's state_dict loads (finite), and
    each channel's ensemble, through fusecare's own CPU prediction path, gives this torch's output
    on a seeded 16x64x64 block. Set FUSECARE_OLD_TORCH_PYTHON to that Python; PyPI's torch 2.1.0
    (a CUDA build, about 2.7 GB with its nvidia-* wheels; it runs on CPU) makes one:
    ``python3.11 -m venv V && V/bin/pip install torch==2.1.0 'numpy<2' scipy tifffile imagecodecs tqdm``
    (torch 2.1 was built against NumPy 1: with NumPy 2 ``torch.from_numpy`` fails)."""
    python = os.environ.get("FUSECARE_OLD_TORCH_PYTHON")
    if not python:
        pytest.skip("no Python with torch 2.1 here (FUSECARE_OLD_TORCH_PYTHON unset; the docstring says "
                    "how to make one from PyPI, about 2.7 GB)")
    import numpy as np

    from fusecare.restoration.ensemble import load_ensemble

    weights = sorted((REPO / "model_weights").glob("*/member_*/weights.pt"))
    assert weights
    out = tmp_path / "old.npz"
    result = subprocess.run([python, "-c", OLD_TORCH_CODE, str(REPO), str(out), *map(str, weights)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == len(weights)
    assert report["channels"] == sorted({w.parent.parent.name for w in weights})
    x = np.random.default_rng(0).standard_normal((16, 64, 64)).astype(np.float32)
    old = np.load(out)
    for channel in report["channels"]:
        here = load_ensemble(REPO / "model_weights" / channel).predict_block(x)
        assert old[channel].shape == here.shape == (2, 16, 64, 64)
        # 0.0 measured (torch 2.1.0 against 2.13.0, CPU); the bound allows other CPU kernels.
        assert float(np.abs(old[channel] - here).max()) <= 1e-4, channel

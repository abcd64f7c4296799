#!/usr/bin/env python
"""Build the bundled demo pairs in samples/ from the real clean volumes in ../shared/data.

Each real volume is treated as the fused target and a single view is derived from it with
``fusecare.training.simulate`` (whole volume, so light crosses the whole specimen, then cropped). Both
are written as ZYX uint16 BigTIFF like the challenge's files (128x128 tiles, resolution tags,
shaped JSON metadata), zlib-compressed so the folder stays small. These are NOT real Fuse My
Cells pairs. Deterministic: the same data and seed give byte-identical volumes.

    .venv/bin/python scripts/make_sample.py [--data-dir ../shared/data] [--out samples] [--seed 1]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusecare.io import read_case  # noqa: E402
from fusecare.scoring.metrics import fmc_ssim  # noqa: E402
from fusecare.training.simulate import SimulationParams, simulate_single_view  # noqa: E402

log = logging.getLogger("make_sample")


@dataclass(frozen=True)
class SampleSpec:
    source: str  # file in the data folder
    name: str  # output file name (same in input/ and target/)
    channel: str
    start_zyx: tuple[int, int, int]  # crop kept after simulating the whole volume
    size_zyx: tuple[int, int, int]


# Crops keep samples/ under ~600 KB (noisy uint16 barely compresses); the nucleus crop is the
# 32x64x56 box of plantnuclei_1135 most covered by nuclei (12 labelled; 38 % of voxels) away
# from its bright streak artefact, the membrane crop centred.
SPECS = (
    SampleSpec("plantnuclei_1135.tif", "sample_nucleus.tif", "nucleus", (44, 18, 20), (32, 64, 56)),
    SampleSpec("ovule_membrane.tif", "sample_membrane.tif", "membrane", (0, 32, 36), (32, 64, 56)),
)


def crop(volume: np.ndarray, spec: SampleSpec) -> np.ndarray:
    box = tuple(slice(a, a + n) for a, n in zip(spec.start_zyx, spec.size_zyx))
    out = volume[box]
    if out.shape != spec.size_zyx:
        raise ValueError(f"{spec.source}: crop {spec.start_zyx}+{spec.size_zyx} leaves {volume.shape}")
    return out


def target_to_uint16(clean: np.ndarray) -> np.ndarray:
    """The clean intensities as uint16, values unchanged (0..255 for the uint8 sources).

    The challenge's metric normalises by percentiles, so the scale carries no information;
    stretching by 257 would cost about 15 % more space after compression for nothing.
    """
    return np.clip(clean.astype(np.float64), 0, 65535).astype(np.uint16)


def write_like_fmc(path: Path, volume: np.ndarray, vs: tuple[float, float, float], channel: str) -> None:
    """The organisers' template conventions, plus zlib compression to keep the repo small.

    ``fusecare.io.write_case`` writes the same layout uncompressed; compression is the only
    difference and every TIFF reader of the challenge handles zlib.
    """
    metadata = {
        "PhysicalSizeX": vs[2],
        "PhysicalSizeY": vs[1],
        "PhysicalSizeZ": vs[0],
        "unit": "micron",
        "axes": "ZYX",
        "channel": channel,
        "study": 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = []
    for predictor in (False, True):  # differencing helps smooth volumes, hurts noisy ones
        buffer = io.BytesIO()
        tifffile.imwrite(
            buffer,
            volume,
            bigtiff=True,
            tile=(128, 128),
            resolution=(1.0 / vs[2], 1.0 / vs[1]),
            metadata=metadata,
            compression="zlib",
            compressionargs={"level": 9},
            predictor=predictor,
        )
        encoded.append(buffer.getvalue())
    path.write_bytes(min(encoded, key=len))


def make(spec: SampleSpec, data_dir: Path, out: Path, seed: int) -> dict[str, object]:
    case = read_case(data_dir / spec.source)
    clean, vs = case.volume, case.meta.voxel_size.zyx
    view, params = simulate_single_view(clean, vs, seed=seed)
    target = target_to_uint16(crop(clean, spec))
    single = np.ascontiguousarray(crop(view, spec))
    write_like_fmc(out / "input" / spec.name, single, vs, spec.channel)
    write_like_fmc(out / "target" / spec.name, np.ascontiguousarray(target), vs, spec.channel)
    score = fmc_ssim(target, single)
    log.info("%s: %s from %s, SSIM(input, target) = %.3f", spec.name, single.shape, spec.source, score)
    return {
        "source": spec.source,
        "crop_start_zyx": list(spec.start_zyx),
        "crop_size_zyx": list(spec.size_zyx),
        "seed": seed,
        "voxel_size_zyx_um": list(vs),
        "ssim_input_target": round(score, 4),
        "simulation": params.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "samples")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data_dir.is_dir():
        log.error("data folder not found: %s", args.data_dir)
        return 1
    record = {spec.name: make(spec, args.data_dir, args.out, args.seed) for spec in SPECS}
    (args.out / "simulation_params.json").write_text(json.dumps(record, indent=2) + "\n")
    # The recorded params must rebuild the same object (guards against schema drift).
    for entry in record.values():
        SimulationParams.from_dict(entry["simulation"])  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

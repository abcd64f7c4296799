"""Which part of the attenuation field helps or harms on one view: light sheet (Y/X) or detection (Z).

The view is ``bench/quality.py``'s (``pair_of``: the physical simulator, seed ``--seed``, against
its simulated dual-view fused target). The tuned Gaussian (0.45 voxel, the fused-target sigma of
``bench/quality.py``) is scored alone and times three fields: the full estimate, its detection (Z)
part alone (the estimate with the light's face forced to the opposite of the one it named, which
finds no light-sheet loss; its Z fit is then slightly different), and the light-sheet part alone
(the full field divided by the Z part). The estimates on the view, on its target and on the clean
volume are printed too: a loss found on the clean volume is the acquisition's own, which the
simulated target keeps.

    python bench/field_parts.py                                   # lateralroot_membrane.tif, view 20000
    python bench/field_parts.py --volume tribolium_cortex.tif --seed 20001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality import REPO, pair_of  # noqa: E402

from fusecare.io import read_case  # noqa: E402
from fusecare.normalize import PercentileNorm  # noqa: E402
from fusecare.restoration.attenuation import estimate_attenuation  # noqa: E402
from fusecare.restoration.gate import smooth  # noqa: E402
from fusecare.scoring.metrics import fmc_ssim, n_ssim  # noqa: E402

SIGMA = 0.45
OPPOSITE = {"start": "end", "end": "start"}


def field_parts(view: np.ndarray, target: np.ndarray, voxel_size_zyx: tuple[float, float, float],
                sigma: float = SIGMA) -> dict[str, object]:
    """N-SSIM of the Gaussian alone and times the full field, its Z part and its Y/X part, with
    the estimates (``describe``) on the view and on the target."""
    x = PercentileNorm.fit(view).forward(view)
    full = estimate_attenuation(x, voxel_size_zyx)
    axis, side = full.illumination.split()
    z_only = estimate_attenuation(x, voxel_size_zyx, light_from=f"{axis} {OPPOSITE[side]}")
    whole = (slice(None),) * 3
    fields = {"alone": None, "x the full field": full.region(whole),
              "x the detection (Z) part": z_only.region(whole)}
    fields["x the light-sheet part"] = fields["x the full field"] / fields["x the detection (Z) part"]
    target_norm = PercentileNorm.fit(target)
    ssim_input = fmc_ssim(target, view, target_norm=target_norm)
    base = smooth(x, sigma)
    scores = {name: n_ssim(fmc_ssim(target, base if f is None else base * f, target_norm=target_norm), ssim_input)
              for name, f in fields.items()}
    return {"view": full.describe(), "z_part": z_only.describe(),
            "target": estimate_attenuation(target_norm.forward(target), voxel_size_zyx).describe(),
            "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--volume", default="lateralroot_membrane.tif")
    parser.add_argument("--seed", type=int, default=20_000)
    args = parser.parse_args()
    path = args.data / args.volume
    if not path.is_file():
        sys.exit(f"volume not found: {path}")
    case = read_case(path)
    voxel, clean = case.meta.voxel_size.zyx, case.volume.astype(np.float32)
    view, target = pair_of(clean, voxel, args.seed, "fused")
    result = field_parts(view, target, voxel)
    own = estimate_attenuation(PercentileNorm.fit(clean).forward(clean), voxel).describe()
    print(f"{args.volume} view {args.seed} (fused target)")
    for name, text in (("view", result["view"]), ("Z part", result["z_part"]), ("target", result["target"]),
                       ("clean volume", own)):
        print(f"  estimate on the {name:<13}{text}")
    for name, score in result["scores"].items():  # type: ignore[union-attr]
        print(f"  Gaussian ({SIGMA}) {name:<28}{score:+.3f}")


if __name__ == "__main__":
    main()

"""Benchmark of the attenuation correction alone (no network), on views of non-test volumes.

The correction's choices (``fusecare/restoration/attenuation.py``: the estimator's knobs and the
field's guard, ``GUARD_RATIO``) are made here, on views of the nets' training and validation
volumes and of phantoms: no net is involved, and no test volume of ``train/splits/heldout.json``
is read. Each view is scored as the input Gaussian-smoothed by 0.5 voxel, times the field,
against its simulated dual-view fused target (N-SSIM). Groups of views:

- plain: the physical simulator, 4 views per volume (both axes, both sides) and 2 phantoms each;
- bright: the volume with 1-3 saturated bright objects first (``randomise_content``);
- thick: every 4th plane kept (4x the Z voxel, like a 4-um stack), strong attenuation;
- strong: attenuation 0.06-0.1/um (the simulator's default draws 0.035-0.065);
- gradient: the content given its own brightness gradient (2.7x across the lateral axis the
  light does not travel along, both directions), which the fused target keeps, as a real
  specimen's own gradient would be;
- interior: the central half (in Y and X) of the validation volumes and of two phantoms, so that
  the specimen fills the frame as in a crop, plain and with both content gradients.

Columns: the Gaussian alone; times the estimated field before the guard, and as shipped (after
it); the shipped field raised to 0.5 (less trust in it); the same field mirrored along its axis
(what an estimate naming the opposite face gives) before and after the guard; how often the
named axis is wrong, and how often the guard rejected the estimate or the mirror. ``fill`` is
the share of the least-covered lateral face inside the specimen mask (1: the specimen fills
the frame).

    python bench/attenuation.py                       # all 132 views, about 2 minutes on 2 CPU cores
    python bench/attenuation.py --groups plain gradient --json out/attenuation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from quality import REPO, entry_face, face_name, pair_of  # noqa: E402

from fusecare.io import read_case  # noqa: E402
from fusecare.normalize import PercentileNorm  # noqa: E402
from fusecare.restoration import attenuation  # noqa: E402
from fusecare.restoration.gate import smooth  # noqa: E402
from fusecare.scoring.metrics import fmc_ssim, n_ssim  # noqa: E402
from fusecare.training.phantoms import PHANTOM_VOXEL_SIZE_ZYX, membrane_phantom, nuclei_phantom  # noqa: E402
from fusecare.training.simulate import SimulatorConfig, randomise_content  # noqa: E402

VOLUMES = ("ovule_membrane.tif", "cellpose3d_cyto.tif", "drosophila_nuclear_envelope.tif", "cellpose3d_nuclei.tif")
"""The nets' training volumes and the validation volumes of both channels (never a test volume)."""
STRONG = SimulatorConfig(mu_illumination=(0.06, 0.1))
BRIGHT = SimulatorConfig(bright_objects=(1, 3))
GRADIENT = 1.0
"""Log of the content gradient's ratio from the middle to either end: exp(1) = 2.7x end to end."""
GROUPS = ("plain", "bright", "thick", "strong", "gradient", "interior")
COLUMNS = ("gaussian", "unguarded", "shipped", "shipped_sqrt", "mirrored", "mirrored_guarded")


def content_gradient(clean: np.ndarray, axis: int, sign: float) -> np.ndarray:
    """``clean`` brightened along ``axis`` by ``exp(sign * GRADIENT * (t - 1/2))``, t in [0, 1]."""
    n = clean.shape[axis]
    shape = [1, 1, 1]
    shape[axis] = n
    ramp = np.exp(sign * GRADIENT * (np.arange(n) / max(n - 1, 1) - 0.5)).astype(np.float32)
    return clean * ramp.reshape(shape)


def views(data: Path, groups: tuple[str, ...]):
    """(group, name, voxel size, view, fused target, true entry face) per view, group by group."""
    volumes = {}
    for name in VOLUMES:
        case = read_case(data / name)
        volumes[name] = case.volume.astype(np.float32), case.meta.voxel_size.zyx
    for group in groups:
        if group == "plain":
            for name, (clean, voxel) in volumes.items():
                for seed in range(10_000, 10_004):
                    yield group, f"{name} {seed}", voxel, *pair_of(clean, voxel, seed, "fused"), seed
            for label, make in (("membrane", membrane_phantom), ("nuclei", nuclei_phantom)):
                for seed in range(50_000, 50_002):
                    clean = make((48, 128, 128), rng=np.random.default_rng(seed))
                    yield (group, f"phantom {label} {seed}", PHANTOM_VOXEL_SIZE_ZYX,
                           *pair_of(clean, PHANTOM_VOXEL_SIZE_ZYX, seed, "fused"), seed)
        elif group == "bright":
            for name, (clean, voxel) in volumes.items():
                for seed in range(11_000, 11_002):
                    bright = randomise_content(clean, voxel, BRIGHT, np.random.default_rng(seed))
                    yield group, f"{name} {seed}", voxel, *pair_of(bright, voxel, seed, "fused"), seed
        elif group == "thick":
            for name in ("cellpose3d_nuclei.tif", "cellpose3d_cyto.tif"):
                clean, voxel = volumes[name]
                thick = (voxel[0] * 4, voxel[1], voxel[2])
                for seed in range(12_000, 12_004):
                    yield group, f"{name} {seed}", thick, *pair_of(clean[::4], thick, seed, "fused", STRONG), seed
        elif group == "strong":
            clean, voxel = volumes["cellpose3d_nuclei.tif"]
            for seed in range(13_000, 13_004):
                yield group, f"cellpose3d_nuclei.tif {seed}", voxel, *pair_of(clean, voxel, seed, "fused", STRONG), seed
        elif group == "interior":
            interiors = {name: volumes[name] for name in VOLUMES[2:] + VOLUMES[1:2]}
            for label, make, seed in (("membrane", membrane_phantom, 50_000), ("nuclei", nuclei_phantom, 50_001)):
                interiors[f"phantom {label}"] = (make((48, 128, 128), rng=np.random.default_rng(seed)),
                                                 PHANTOM_VOXEL_SIZE_ZYX)
            for name, (clean, voxel) in interiors.items():
                ny, nx = clean.shape[1:]
                inner = clean[:, ny // 4:3 * ny // 4, nx // 4:3 * nx // 4]
                for seed in range(15_000, 15_004):
                    other = 2 if entry_face(seed)[0] == "y" else 1
                    for sign in (0.0, 1.0, -1.0):
                        content = content_gradient(inner, other, sign) if sign else inner
                        yield (group, f"{name} interior {seed} gradient {sign:+.0f}", voxel,
                               *pair_of(content, voxel, seed, "fused"), seed)
        elif group == "gradient":
            for name, (clean, voxel) in volumes.items():
                for seed in range(14_000, 14_004):
                    other = 2 if entry_face(seed)[0] == "y" else 1
                    for sign in (1.0, -1.0):
                        tilted = content_gradient(clean, other, sign)
                        yield (group, f"{name} {seed} gradient {sign:+.0f}", voxel,
                               *pair_of(tilted, voxel, seed, "fused"), seed)


def score_view(voxel, view: np.ndarray, target: np.ndarray, seed: int) -> dict:
    target_norm = PercentileNorm.fit(target)
    ssim_input = fmc_ssim(target, view, target_norm=target_norm)
    x = PercentileNorm.fit(view).forward(view)
    smoothed = smooth(x, 0.5)

    def score(field: np.ndarray | None) -> float:
        prediction = smoothed if field is None else smoothed * field
        return n_ssim(fmc_ssim(target, prediction, target_norm=target_norm), ssim_input)

    if attenuation.working_factors(x.shape) != (1, 1, 1):
        raise ValueError("bench views are estimated at full resolution; this one needs a coarse grid")
    coarse = attenuation.coarse_view(x, voxel)
    unguarded, face, *_ = attenuation.estimate_on_grid(x, voxel, coarse=coarse)
    field, ratio, rejected = attenuation.guard(coarse, unguarded)  # as estimate_attenuation applies it
    mirrored = np.flip(unguarded, axis="zyx".index(face[0]))
    mirrored_ratio = attenuation.brightest_gain(coarse, mirrored)
    truth = face_name(seed)
    mask = attenuation.fit_mask(coarse)
    fill = min(float(side.mean()) for side in (mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]))
    return {"truth": truth, "face": face, "wrong_axis": unguarded.max() > 1.0 and face[0] != truth[0],
            "ratio": ratio, "mirrored_ratio": mirrored_ratio, "rejected": rejected,
            "mirrored_rejected": mirrored_ratio > attenuation.GUARD_RATIO,
            "gaussian": score(None), "unguarded": score(unguarded),
            "shipped": score(field), "shipped_sqrt": score(np.sqrt(field)), "fill": fill,
            "mirrored": score(mirrored), "mirrored_guarded": score(None if mirrored_ratio > attenuation.GUARD_RATIO
                                                                    else mirrored)}


def summary(rows: list[dict], label: str) -> str:
    cells = "".join(f"{np.mean([r[c] for r in rows]):>10.3f} ({min(r[c] for r in rows):+.2f})" for c in COLUMNS)
    return (f"{label:<10}{len(rows):>4}{cells}{sum(r['wrong_axis'] for r in rows):>6}"
            f"{sum(r['rejected'] for r in rows):>6}{sum(r['mirrored_rejected'] for r in rows):>6}"
            f"{max(r['ratio'] for r in rows):>7.2f}")


THRESHOLDS = (1.05, 1.1, 1.15, 1.2, 1.25)
CHOSEN_ON = ("plain", "bright", "thick", "strong")
"""The groups ``attenuation.GUARD_RATIO`` was chosen on (session 11); the others came later."""
FRAME_FILLING = 0.75
"""Views whose least-covered lateral face is at least this much specimen fill the frame."""


def guard_table(rows: list[dict]) -> list[str]:
    """What each guard threshold would do to the estimated and the mirrored fields of ``rows``
    (from their stored ratios: a rejected field scores as the Gaussian alone)."""
    lines = [f"{'threshold':>10}{'estimates rejected':>20}{'estimated, guarded':>22}{'mirrored, guarded':>22}"]
    for threshold in THRESHOLDS:
        kept = [r["unguarded"] if r["ratio"] <= threshold else r["gaussian"] for r in rows]
        mirrored = [r["mirrored"] if r["mirrored_ratio"] <= threshold else r["gaussian"] for r in rows]
        lines.append(f"{threshold:>10.2f}{sum(r['ratio'] > threshold for r in rows):>20}"
                     f"{np.mean(kept):>15.3f} ({min(kept):+.2f}){np.mean(mirrored):>15.3f} ({min(mirrored):+.2f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not all((args.data / name).is_file() for name in VOLUMES):
        sys.exit(f"the volumes {', '.join(VOLUMES)} were not found in {args.data}")
    rows = []
    print(f"{'group':<10}{'view':<44}{'truth':<9}{'named':<9}{'ratio':>6}{'fill':>6}"
          + "".join(f"{c:>17}" for c in COLUMNS))
    for group, name, voxel, view, target, seed in views(args.data, tuple(args.groups)):
        row = {"group": group, "view": name, **score_view(voxel, view, target, seed)}
        rows.append(row)
        print(f"{group:<10}{name[:43]:<44}{row['truth']:<9}{row['face']:<9}{row['ratio']:>6.2f}{row['fill']:>6.2f}"
              + "".join(f"{row[c]:>17.3f}" for c in COLUMNS)
              + ("  field rejected" if row["rejected"] else ""), flush=True)
    print("\nmean N-SSIM (worst); wrong: axis named wrong (with a field); rej: the estimate rejected; "
          "mrej: the mirrored field rejected; max ratio: the largest brightest-tenth ratio of an estimate")
    print(f"{'group':<10}{'n':>4}" + "".join(f"{c:>17}" for c in COLUMNS) + f"{'wrong':>6}{'rej':>6}{'mrej':>6}"
          f"{'max ratio':>10}")
    for group in args.groups:
        print(summary([r for r in rows if r["group"] == group], group))
    no_gradient = [r for r in rows if r["group"] != "gradient"]
    if no_gradient and len(no_gradient) < len(rows):
        print(summary(no_gradient, "all but gradient"))
    print(summary(rows, "all"))
    filling = [r for r in rows if r["fill"] >= FRAME_FILLING]
    if filling and len(filling) < len(rows):
        print(summary(filling, "fill>=0.75"))
        print(summary([r for r in rows if r["fill"] < FRAME_FILLING], "fill<0.75"))
    chosen_on = [r for r in rows if r["group"] in CHOSEN_ON]
    for label, selected in ((f"the views it was chosen on ({', '.join(CHOSEN_ON)})", chosen_on), ("all views", rows)):
        if selected:
            print(f"\nthe guard's threshold (shipped: {attenuation.GUARD_RATIO}), {label}: {len(selected)}")
            print("\n".join(guard_table(selected)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"guard_ratio": attenuation.GUARD_RATIO, "rows": rows}, indent=1,
                                        default=bool) + "\n")


if __name__ == "__main__":
    main()

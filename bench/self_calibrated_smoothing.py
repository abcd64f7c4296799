"""Benchmark: can each case choose its own smoothing from its input alone?

The tuned Gaussian is the strongest content-free baseline on held-out membrane content, yet one
sigma cannot suit every study: it helps noisy views and hurts sharp, thin structure. This
measures a self-supervised choice, per case, against one sigma chosen on other volumes:

* ``fixed``: the sigma with the best mean N-SSIM over the *other* volumes (leave one volume out);
* ``j-invariant``: per case, the sigma whose J-invariant Gaussian (its centre weight removed and
  the rest renormalised, Batson & Royer, Noise2Self, ICML 2019) best predicts the input itself:
  ``mean((G0 x - x)^2)`` is the error against the noise-free signal plus the noise variance, so
  its minimum needs no target (``skimage.restoration.calibrate_denoiser`` does the same by
  masking; for a linear filter removing the centre weight is exact and one filter per sigma);
* ``j-invariant x k``: that sigma scaled by a factor chosen leave-one-volume-out.

Only volumes outside the split's 'test' lists are used (training and validation volumes of both
channels, and phantoms): a Gaussian learns nothing from them, and the benchmark's test volumes
stay unseen by any choice. Views: the physical default simulator, fused targets, 4 seeds each.

    python bench/self_calibrated_smoothing.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import TUNING_SEED, Case, phantom_cases, volume_cases  # noqa: E402

from fusecare.normalize import PercentileNorm  # noqa: E402
from fusecare.restoration.gate import GateConfig, gaussian_kernel1d, smooth  # noqa: E402
from fusecare.training.calibration import ValidationPrediction, evaluate_candidates  # noqa: E402
from fusecare.training.pairs import load_split  # noqa: E402

SIGMAS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0, 1.3)
SCALES = tuple(np.round(np.arange(0.6, 1.61, 0.1), 1))


def j_invariant_loss(x: np.ndarray, sigma: float) -> float:
    """``mean((G0 x - x)^2)`` for the Gaussian ``G`` the gate smooths with and ``G0`` its
    J-invariant version (centre weight 0, the rest renormalised)."""
    centre = float(gaussian_kernel1d(sigma).max()) ** x.ndim
    j_invariant = (smooth(x, sigma) - np.float32(centre) * x) / np.float32(1.0 - centre)
    return float(np.mean((j_invariant - x) ** 2))


def score_cases(cases: list[Case]) -> list[dict]:
    """Per case: N-SSIM of the Gaussian at every sigma, and the J-invariant loss at every sigma."""
    rows = []
    for case in cases:
        prediction = ValidationPrediction(case.name, case.source, case.target, case.source, case.source)
        table = evaluate_candidates([prediction], [GateConfig(blend=0.0, fallback_sigma=s) for s in SIGMAS])[1:]
        x = PercentileNorm.fit(case.source).forward(case.source).astype(np.float32)
        rows.append({"volume": case.name.split(" view ")[0], "n_ssim": np.array([c.n_ssim[0] for c in table]),
                     "loss": np.array([j_invariant_loss(x, s) for s in SIGMAS])})
    return rows


def at_sigma(row: dict, sigma: float) -> float:
    """N-SSIM at ``sigma``, interpolated between the measured sigmas (clamped at the ends)."""
    return float(np.interp(sigma, SIGMAS, row["n_ssim"]))


def j_invariant_sigma(row: dict, scale: float = 1.0) -> float:
    return SIGMAS[int(np.argmin(row["loss"]))] * scale


def per_volume_mean(rows: list[dict], score) -> float:
    """Mean over volumes of each volume's mean score (views of one volume count once together)."""
    volumes = sorted({r["volume"] for r in rows})
    return float(np.mean([np.mean([score(r) for r in rows if r["volume"] == v]) for v in volumes]))


def leave_one_volume_out(rows: list[dict]) -> list[tuple[str, float, float, float]]:
    """Per volume: (volume, fixed sigma chosen on the others, its N-SSIM, j-invariant x k's N-SSIM)."""
    out = []
    for volume in sorted({r["volume"] for r in rows}):
        held, others = ([r for r in rows if (r["volume"] == volume) == keep] for keep in (True, False))
        best = max(range(len(SIGMAS)), key=lambda i: per_volume_mean(others, lambda r: r["n_ssim"][i]))
        scale = max(SCALES, key=lambda k: per_volume_mean(others, lambda r: at_sigma(r, j_invariant_sigma(r, k))))
        out.append((volume, SIGMAS[best], per_volume_mean(held, lambda r, i=best: r["n_ssim"][i]),
                    per_volume_mean(held, lambda r, k=scale: at_sigma(r, j_invariant_sigma(r, k)))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, default=REPO / "train" / "splits" / "heldout.json")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--target", default="fused")
    args = parser.parse_args(argv)
    split = load_split(args.split, args.data)
    rows = []
    scored: set[str] = set()  # a volume both channels train or validate on is one volume, scored once
    for channel, roles in split.items():
        files = [f for role in ("train", "validation") for f in roles.get(role, []) if f.name not in scored]
        scored.update(f.name for f in files)
        cases = volume_cases(files, "train", range(TUNING_SEED, TUNING_SEED + args.views), args.target)
        rows += [{**r, "volume": f"{channel}: {r['volume']}"}
                 for r in score_cases(cases + phantom_cases(channel, 2, args.target))]
    print(f"{'volume (never a test volume)':<44}{'fixed sigma':>12}{'fixed':>8}{'j-inv':>8}{'j-inv x k':>10}")
    folds = leave_one_volume_out(rows)
    for volume, sigma, fixed, scaled in folds:
        plain = per_volume_mean([r for r in rows if r["volume"] == volume], lambda r: at_sigma(r, j_invariant_sigma(r)))
        print(f"{volume:<44}{sigma:>12.2f}{fixed:>8.3f}{plain:>8.3f}{scaled:>10.3f}")
    plain_all = per_volume_mean(rows, lambda r: at_sigma(r, j_invariant_sigma(r)))
    print(f"{'mean over volumes (leave one volume out)':<44}{'':>12}{np.mean([f[2] for f in folds]):>8.3f}"
          f"{plain_all:>8.3f}{np.mean([f[3] for f in folds]):>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

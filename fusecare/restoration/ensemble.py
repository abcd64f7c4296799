"""An ensemble of CARE members on disk and its per-block prediction: mean and disagreement.

Layout of ``model_weights/<channel>/``::

    manifest.json            format, channel, members, sha256 of every member file, gate
    member_0/config.json     ModelConfig (validated on load, axes 'ZYX')
    member_0/weights.pt      state_dict (loaded with ``weights_only=True``)
    member_1/...

The manifest's checksums are verified before any weight is loaded, so a truncated copy or a
file swapped by hand fails with one clear line instead of a silently different model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusecare.device import resolve_device
from fusecare.errors import ConfigError, WeightsError
from fusecare.profiling import phase
from fusecare.restoration.gate import GateConfig
from fusecare.restoration.model import CareUNet, ModelConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MEMBER_CONFIG = "config.json"
MEMBER_WEIGHTS = "weights.pt"
MANIFEST_FORMAT = "fusecare-ensemble/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def save_member(member_dir: Path, model: CareUNet, *, extra_files: Mapping[str, Any] | None = None) -> None:
    """Write one member: ``config.json`` beside ``weights.pt`` (plus optional JSON files)."""
    member_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(member_dir / MEMBER_CONFIG)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, member_dir / MEMBER_WEIGHTS)
    for name, content in (extra_files or {}).items():
        (member_dir / name).write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")


def write_manifest(ensemble_dir: Path, channel: str, *, gate: GateConfig | None = None,
                   info: Mapping[str, Any] | None = None) -> Path:
    """Hash every file of every ``member_*`` folder into ``manifest.json``."""
    members = sorted(p.name for p in ensemble_dir.glob("member_*") if p.is_dir())
    if not members:
        raise WeightsError(f"no member_* folder in {ensemble_dir}")
    files = {
        str(f.relative_to(ensemble_dir)): sha256_file(f)
        for m in members for f in sorted((ensemble_dir / m).rglob("*")) if f.is_file()
    }
    manifest = {
        "format": MANIFEST_FORMAT, "channel": channel, "members": members, "files": files,
        "gate": gate.to_dict() if gate is not None else None, "info": dict(info or {}),
    }
    path = ensemble_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")  # strict JSON parsers read it
    return path


# --------------------------------------------------------------------------- loading


def read_manifest(ensemble_dir: Path) -> dict[str, Any]:
    """An ensemble's manifest, checked to be one (``WeightsError`` naming the file otherwise)."""
    path = ensemble_dir / MANIFEST
    if not path.is_file():
        raise WeightsError(f"no {MANIFEST} in {ensemble_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise WeightsError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for key in ("members", "files"):
        if key not in manifest:
            raise WeightsError(f"{path}: missing key {key!r}")
    return manifest


def verify_manifest(ensemble_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Every member's config and weights listed, present and matching its sha256."""
    files: Mapping[str, str] = manifest["files"]
    for member in manifest["members"]:
        for name in (MEMBER_CONFIG, MEMBER_WEIGHTS):
            if f"{member}/{name}" not in files:
                raise WeightsError(f"{ensemble_dir / MANIFEST}: {member}/{name} is not listed")
    for rel, expected in files.items():
        path = ensemble_dir / rel
        if not path.is_file():
            raise WeightsError(f"missing weights file {path}")
        if sha256_file(path) != expected:
            raise WeightsError(f"checksum mismatch for {path}: the file differs from its manifest")


def load_member(member_dir: Path, device: torch.device) -> CareUNet:
    try:
        config = ModelConfig.load(member_dir / MEMBER_CONFIG)
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    model = CareUNet(config)
    try:
        state = torch.load(member_dir / MEMBER_WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot load {member_dir / MEMBER_WEIGHTS}: {first_line}") from None
    return model.to(device).eval()


@dataclass
class Ensemble:
    """Loaded members of one channel; ``predict_block`` gives mean and per-voxel spread."""

    members: list[CareUNet]
    channel: str
    device: torch.device
    gate: GateConfig | None = None
    fp16: bool = False
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.channels_last:
            # 15-25% faster for 3-D convolutions on CPU (bf16 on CPU is ~200x slower: never used);
            # on CUDA the layout cuDNN's float16 tensor-core kernels want.
            self.members = [m.to(memory_format=torch.channels_last_3d) for m in self.members]
        if self.device.type == "cuda":
            # every tile has the same shape: the fastest algorithm is searched once, then reused
            torch.backends.cudnn.benchmark = True

    @property
    def alignment(self) -> int:
        return max(m.config.alignment for m in self.members)

    @property
    def corrected_input(self) -> bool:
        """The members read the view times its attenuation field (``ModelConfig.corrected_input``;
        ``load_ensemble`` refuses members that disagree)."""
        return any(m.config.corrected_input for m in self.members)

    @property
    def receptive_field_radius(self) -> int:
        return max(m.config.receptive_field_radius for m in self.members)

    @property
    def margin(self) -> int:
        """Context margin for tiling: the widest member's (see ``ModelConfig.tiling_margin``)."""
        return max(m.config.tiling_margin for m in self.members)

    @torch.inference_mode()
    def predict_block(self, block: np.ndarray, members: int | None = None) -> np.ndarray:
        """Normalised float32 (Z, Y, X) -> float32 (2, Z, Y, X): member mean and spread.

        ``members`` uses only the first so many (the time budget's cheaper mode).
        """
        return self.predict_tensor(block, members).cpu().numpy()

    @torch.inference_mode()
    def predict_tensor(self, block: np.ndarray | torch.Tensor, members: int | None = None) -> torch.Tensor:
        """``predict_block`` that stays on the ensemble's device: a (Z, Y, X) array or tensor in,
        a float32 (2, Z, Y, X) tensor on ``device`` out, so the gate can run there too.

        The spread is the standard deviation across members, or, when members are
        probabilistic, that of the equal-weight mixture of their Laplace distributions
        (each contributes variance ``2 * scale**2``).
        """
        if isinstance(block, torch.Tensor):
            x = block.to(self.device, dtype=torch.float32)[None, None]
        else:
            x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[None, None].to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        # Sums of differences from the first member's location: E[x^2] - E[x]^2 of the raw
        # locations cancels catastrophically in float32 when members nearly agree. The sums live
        # in the result itself and every step is in place: no whole-tile temporaries.
        result = x.new_zeros((2, *x.shape[-3:]))
        total, total_sq = result[0], result[1]
        shift: torch.Tensor | None = None
        chosen = self.members if members is None else self.members[:members]
        voxels = total.numel()
        bases: dict[float, torch.Tensor] = {}  # the residual's smoothed input, once per base_sigma
        for k, member in enumerate(chosen):
            with phase(f"network member {k}", voxels):
                out = self._forward(member, x, _shared_base(member, x, bases))
            with phase("members' mean and spread", voxels):
                if shift is None:
                    shift = out[0]
                else:
                    difference = out[0].sub_(shift)
                    total += difference
                    total_sq.addcmul_(difference, difference)
                if out.shape[0] > 1:
                    total_sq.addcmul_(out[1], out[1], value=2.0)
        with phase("members' mean and spread", voxels):
            mean_difference = total.div_(len(chosen))
            total_sq.div_(len(chosen)).addcmul_(mean_difference, mean_difference, value=-1.0)
            total_sq.clamp_(min=0.0).sqrt_()
            total.add_(shift)
        return result

    def _forward(self, member: CareUNet, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """One member's float32 output for a (1, 1, Z, Y, X) block (float16 autocast on CUDA when
        asked).

        A float16 output with NaN/Inf is redone in float32 for this block only: the shipped
        members' activations reach about 35x the normalised input, so a few very bright voxels
        (normalised values above about 1,800) overflow float16's 65,504, and a whole case must
        not fall back to its input for them.
        """
        use_fp16 = self.fp16 and self.device.type == "cuda"
        # No autocast context at all unless float16 is used: torch 2.1-2.2 (the Dockerfile accepts
        # any 2.x) raise on entering even a disabled CPU autocast with dtype float16.
        with torch.autocast("cuda", dtype=torch.float16) if use_fp16 else contextlib.nullcontext():
            out = (member(x) if base is None else member(x, base))[0].float()
        if use_fp16 and not bool(torch.isfinite(out).all()):
            log.warning("float16 gave NaN/Inf on a %s block: redone in float32", tuple(x.shape[-3:]))
            with torch.autocast("cuda", enabled=False):
                out = (member(x) if base is None else member(x, base))[0].float()
        return out


def _shared_base(member: CareUNet, x: torch.Tensor, bases: dict[float, torch.Tensor]) -> torch.Tensor | None:
    """The residual's smoothed input for ``member``, computed by the first member of its
    ``base_sigma`` and reused by the others (about 4 % of a member's time per tile on CPU); None
    when the member smooths nothing (or is not a ``CareUNet``: it then computes what it needs)."""
    config = getattr(member, "config", None)
    if not isinstance(config, ModelConfig) or not config.residual or config.base_sigma <= 0:
        return None
    if config.base_sigma not in bases:
        bases[config.base_sigma] = member.base(x)
    return bases[config.base_sigma]


def load_ensemble(ensemble_dir: str | Path, *, device: torch.device | str = "cpu",
                  fp16: bool = False, channels_last: bool = True) -> Ensemble:
    """Verify the manifest's checksums, then load every member onto ``device``."""
    ensemble_dir = Path(ensemble_dir)
    if not ensemble_dir.is_dir():
        hint = ""
        if (ensemble_dir.parent / MANIFEST).is_file():  # --weights named one channel's folder
            hint = (f" ({ensemble_dir.parent} is itself an ensemble: pass the folder above it, which holds "
                    "nucleus/ and membrane/)")
        raise WeightsError(f"no weights folder {ensemble_dir}{hint}")
    manifest = read_manifest(ensemble_dir)
    verify_manifest(ensemble_dir, manifest)
    device = resolve_device(device) if isinstance(device, str) else device
    members = [load_member(ensemble_dir / m, device) for m in manifest["members"]]
    if not members:
        raise WeightsError(f"{ensemble_dir / MANIFEST} lists no member")
    if len({m.config.corrected_input for m in members}) > 1:
        raise WeightsError(f"{ensemble_dir}: some members read the corrected view (config field "
                           "'corrected_input'), others the view itself; an ensemble's members must agree")
    gate = None
    if manifest.get("gate"):
        try:
            gate = GateConfig.from_dict(manifest["gate"])
        except ConfigError as exc:
            raise WeightsError(f"{ensemble_dir / MANIFEST}: gate: {exc}") from None
    log.info("loaded %d member(s) from %s on %s", len(members), ensemble_dir, device)
    return Ensemble(members=members, channel=str(manifest.get("channel", ensemble_dir.name)),
                    device=device, gate=gate, fp16=fp16, channels_last=channels_last)

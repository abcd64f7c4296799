"""BioImage Model Zoo export: the package passes bioimageio.core's own test, predicts what fusecare
predicts (ungated), carries what the zoo asks for, and bad input fails in one line with no zip left."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_ensemble

from fusecare.cli.export import build_parser, run
from fusecare.export import bioimageio as export
from fusecare.export import zoo_arch
from fusecare.normalize import PercentileNorm
from fusecare.restoration.ensemble import load_ensemble
from fusecare.restoration.model import CareUNet, ModelConfig

pytest.importorskip("bioimageio.core")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(zip, ensemble folder) of a tiny random membrane ensemble, exported without the built-in test
    (the test below runs it, so it runs once)."""
    root = tmp_path_factory.mktemp("export")
    folder = make_tiny_ensemble(root / "weights", "membrane", gate_scale=0.5)
    path = export.export_bioimageio("membrane", root / "weights", root / "out", test=False,
                                    model_card=export.MODEL_CARD)
    return path, folder


@pytest.mark.slow
def test_package_passes_bioimageio_core_test_model(exported):
    from bioimageio.core import test_model

    summary = test_model(exported[0])
    failures = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
    assert summary.status == "passed", failures
    tested = " ".join(d.name for d in summary.details)
    assert "pytorch_state_dict" in tested and "torchscript" in tested, tested


def test_package_predicts_fusecare_ungated_mean(exported, rng):
    """bioimageio.core pads the input by the halo (symmetric) and only then takes the percentiles,
    so its normalisation is that of the padded volume; the network part must agree to 1e-4
    wherever both see the same data: in the halo-free interior, and everywhere once the
    pipeline's padding is switched off."""
    from bioimageio.core import create_prediction_pipeline, load_description, predict
    from bioimageio.core.digest_spec import create_sample_for_model

    path, folder = exported
    ensemble = load_ensemble(folder, channels_last=False)
    halo = ensemble.margin
    volume = (rng.gamma(2.0, 150.0, (56, 60, 64)) + 100).astype(np.float32)  # not the test input

    def fusecare(norm: PercentileNorm) -> np.ndarray:
        return ensemble.predict_block(norm.forward(volume))[0]

    [tensor] = predict(model=path, inputs=volume[None, None]).members.values()
    got = np.asarray(tensor.data, dtype=np.float32).reshape(volume.shape)
    padded_norm = PercentileNorm.fit(np.pad(volume, halo, mode="symmetric"))
    inner = (slice(halo, -halo),) * 3
    np.testing.assert_allclose(got[inner], fusecare(padded_norm)[inner], atol=1e-4, rtol=0)

    descr = load_description(path)
    pipeline = create_prediction_pipeline(descr)
    with pipeline:
        sample = create_sample_for_model(descr, inputs=volume[None, None], sample_id="s")
        output = pipeline.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
    [tensor] = output.members.values()
    got = np.asarray(tensor.data, dtype=np.float32).reshape(volume.shape)
    np.testing.assert_allclose(got, fusecare(PercentileNorm.fit(volume)), atol=1e-4, rtol=0)


def test_description_carries_what_the_zoo_asks_for(exported):
    from bioimageio.spec import load_model_description

    path, folder = exported
    ensemble = load_ensemble(folder, channels_last=False)
    descr = load_model_description(path)
    assert descr.format_version.startswith("0.5")
    [inp], [out] = descr.inputs, descr.outputs
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "z", "y", "x"]
    assert [str(a.id) for a in out.axes] == ["batch", "channel", "z", "y", "x"]
    for axis in inp.axes[2:]:
        assert (axis.size.min, axis.size.step) == (2 * ensemble.margin + ensemble.alignment, ensemble.alignment)
    assert [axis.halo for axis in out.axes[2:]] == [ensemble.margin] * 3 == [24] * 3
    [scale] = [p for p in inp.preprocessing if p.id == "scale_range"]
    assert (scale.kwargs.min_percentile, scale.kwargs.max_percentile) == (2.0, 99.8)
    assert [str(a) for a in scale.kwargs.axes] == ["z", "y", "x"]
    assert descr.weights.pytorch_state_dict is not None and descr.weights.torchscript is not None
    assert descr.weights.pytorch_state_dict.architecture.callable == "EnsembleMean"
    assert str(descr.license) == "BSD-3-Clause" and descr.authors[0].name == "fusecare developers"
    assert str(descr.cite[0].doi) == "10.1038/s41592-018-0216-7"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        doc = z.read("README.md").decode()
    assert {"rdf.yaml", "cover.png", "zoo_arch.py", "test_input.npy", "test_output.npy"} <= names
    assert "## Validation" in doc and "membrane " in doc.split("## Validation")[1]  # the model card's rows
    assert "ungated" in doc.lower() and "NOT trained on Fuse My Cells" in doc


def test_shipped_architecture_matches_care_unet_state_dict_and_numbers():
    torch.manual_seed(3)
    configs = [ModelConfig(first_filters=4, depth=3), ModelConfig(first_filters=4, probabilistic=True, residual=False),
               ModelConfig(first_filters=4, base_sigma=0.6)]
    members = [CareUNet(c).eval() for c in configs]
    module = zoo_arch.EnsembleMean([export.member_kwargs(c) for c in configs]).eval()
    for target, member in zip(module.members, members):
        target.load_state_dict(member.state_dict(), strict=True)
    x = torch.rand(1, 1, 8, 16, 24)
    with torch.no_grad():
        expected = sum(m(x)[:, :1] for m in members) / 3
        np.testing.assert_allclose(module(x).numpy(), expected.numpy(), atol=1e-6)
        traced = torch.jit.trace(module, x, check_trace=False)
        y = torch.rand(2, 1, 16, 8, 32)  # another shape: the trace is not frozen to the first one
        np.testing.assert_allclose(traced(y).numpy(), module(y).numpy(), atol=1e-6)


@pytest.mark.parametrize("sigma", [0.45, 0.6, 1.7, 3.0])
def test_shipped_architecture_smooths_with_the_gates_kernel(sigma):
    """zoo_arch cannot import fusecare, so it keeps its own copy of the Gaussian: the same weights."""
    from fusecare.restoration.gate import gaussian_kernel1d

    np.testing.assert_allclose(zoo_arch._gaussian_weights(sigma).numpy(), gaussian_kernel1d(sigma), atol=1e-7)


def test_validation_section_without_model_card_says_so():
    assert "No validation numbers" in export.validation_section("membrane", None)
    section = export.validation_section("membrane", export.MODEL_CARD)
    held_out = [line for line in export.MODEL_CARD.read_text().splitlines()
                if line.startswith("| membrane | **held-out** |")]
    assert held_out and all(line in section for line in held_out)  # the shipped held-out rows, quoted
    assert "| nucleus" not in section  # only the channel's own rows


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def export_command(argv: list[str]) -> int:
    """``python -m fusecare.export ARGV`` in this process (its exit status)."""
    return run(build_parser("python -m fusecare.export").parse_args(argv))


def test_channel_without_weights_is_one_line(tmp_path, caplog):
    make_tiny_ensemble(tmp_path / "w", "membrane")
    code = export_command(["bioimageio", "--channel", "nucleus", "-o", str(tmp_path / "out"),
                        "--weights", str(tmp_path / "w")])
    assert code == 2
    [message] = _errors(caplog)
    assert "no weights for channel 'nucleus'" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_member_config_not_expressible_is_one_line(tmp_path, caplog, monkeypatch):
    make_tiny_ensemble(tmp_path / "w", "membrane")
    monkeypatch.setattr(export, "EXPRESSIBLE_FIELDS", tuple(f for f in export.EXPRESSIBLE_FIELDS if f != "residual"))
    (tmp_path / "out").mkdir()
    code = export_command(["bioimageio", "--channel", "membrane", "-o", str(tmp_path / "out"),
                        "--weights", str(tmp_path / "w")])
    assert code == 2
    [message] = _errors(caplog)
    assert message.startswith("member_0: config field 'residual' cannot be expressed")
    assert list((tmp_path / "out").iterdir()) == []  # no zip, no partial zip


def test_members_that_read_the_corrected_view_are_refused_in_one_line(tmp_path, caplog):
    """A model-zoo runner feeds the view itself; such members need fusecare's field first."""
    make_tiny_ensemble(tmp_path / "w", "membrane", corrected_input=True)
    (tmp_path / "out").mkdir()
    code = export_command(["bioimageio", "--channel", "membrane", "-o", str(tmp_path / "out"),
                        "--weights", str(tmp_path / "w")])
    assert code == 2
    [message] = _errors(caplog)
    assert message.startswith("member_0: reads the view times its attenuation field") and "\n" not in message
    assert list((tmp_path / "out").iterdir()) == []


def test_non_empty_output_folder_needs_overwrite(tmp_path, caplog):
    make_tiny_ensemble(tmp_path / "w", "membrane")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["bioimageio", "--channel", "membrane", "-o", str(out), "--weights", str(tmp_path / "w"), "--no-test"]
    assert export_command(args) == 2
    [message] = _errors(caplog)
    assert "exists and is not empty (use --overwrite" in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert export_command([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fusecare-membrane.zip", "keep.txt"]


def test_failure_while_packaging_leaves_nothing(tmp_path, monkeypatch):
    import bioimageio.spec

    make_tiny_ensemble(tmp_path / "w", "membrane")

    def broken(descr, *, output_path, **kwargs):
        Path(output_path).write_bytes(b"PK half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(bioimageio.spec, "save_bioimageio_package", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_bioimageio("membrane", tmp_path / "w", tmp_path / "out", test=False)
    assert not (tmp_path / "out").exists()

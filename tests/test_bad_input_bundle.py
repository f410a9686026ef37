"""Bad bundles: symbolic links, paths outside the root, manifests that disagree with the graph,
extra Triton versions, and a swap between verification and load. Each case asserts the class, that the
message names the culprit, that nothing outside the bundle was read, and that nothing was written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deploycompress.backends.base import TensorSpec
from deploycompress.backends.onnxruntime import OnnxRuntimeBackend
from deploycompress.bundle import BundleError, load_bundle, verify_bundle, write_bundle
from deploycompress.bundle import loader
from deploycompress.cli import main

ARTIFACT = "model_repository/tiny/1/model.onnx"
SPEC_IN = [TensorSpec("x", ("batch", 4), "float32")]
SPEC_OUT = [TensorSpec("y", ("batch", 3), "float32")]


def _export(path: Path, scale: float) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(scale)
    torch.onnx.export(model, (torch.randn(2, 4),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    return _export(d / "a.onnx", 1.0), _export(d / "b.onnx", -3.0)


@pytest.fixture()
def bundle(tmp_path, graphs) -> Path:
    out = tmp_path / "bundle"
    write_bundle(out, name="tiny", backend="onnxruntime", artifact=graphs[0], precision="fp32", inputs=SPEC_IN, outputs=SPEC_OUT,
                 extra_files={"source/model.fp32.onnx": graphs[0]})
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"<dir/link>")
            for p in sorted(root.rglob("*"))}


def _reads(monkeypatch) -> list[str]:
    seen: list[str] = []
    original = loader._read_nofollow

    def spy(path):
        seen.append(str(path))
        return original(path)

    monkeypatch.setattr(loader, "_read_nofollow", spy)
    return seen


def _edit_manifest(bundle: Path, **fields) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def _torch_out(scale: float) -> np.ndarray:
    """The oracle: the PyTorch layer _export wrote, run in PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        return (torch.ones(1, 4) @ (model.weight * scale).T + model.bias).numpy()


def _run(runner) -> np.ndarray:
    return runner.run({"x": np.ones((1, 4), np.float32)})["y"]


# -- symbolic links --------------------------------------------------------------------------------
def test_file_replaced_by_link_to_identical_outside_copy_is_refused_before_reading(bundle, tmp_path, monkeypatch):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / ARTIFACT).read_bytes())  # identical bytes: checksums alone would pass
    (bundle / ARTIFACT).unlink()
    os.symlink(outside, bundle / ARTIFACT)
    reads = _reads(monkeypatch)
    before = _snapshot(bundle)
    for call in (verify_bundle, load_bundle):
        with pytest.raises(BundleError, match=r"'model_repository/tiny/1/model.onnx' is a symbolic link"):
            call(bundle)
    assert reads == []  # refused before any file (inside or outside) was opened
    assert _snapshot(bundle) == before


def test_added_link_and_linked_directory_are_refused_by_name(bundle, tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("x")
    os.symlink(secret / "key", bundle / "extra.txt")
    reads = _reads(monkeypatch)
    with pytest.raises(BundleError, match=r"'extra.txt' is a symbolic link"):
        verify_bundle(bundle)
    (bundle / "extra.txt").unlink()
    os.symlink(secret, bundle / "source" / "more")
    with pytest.raises(BundleError, match=r"'source/more' is a symbolic link"):
        load_bundle(bundle)
    assert reads == []


def test_cli_inspect_and_validate_refuse_a_linked_bundle(bundle, tmp_path, capsys):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / ARTIFACT).read_bytes())
    (bundle / ARTIFACT).unlink()
    os.symlink(outside, bundle / ARTIFACT)
    assert main(["inspect", str(bundle)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    assert main(["validate", str(bundle), "--data", str(tmp_path / "x.npy")]) == 2
    assert "model_repository/tiny/1/model.onnx" in capsys.readouterr().err


# -- paths and manifest fields ---------------------------------------------------------------------
@pytest.mark.parametrize("artifact", ["../outside.onnx", "/etc/hostname", "source/../../outside.onnx"])
def test_artifact_outside_the_root_is_refused(bundle, artifact):
    _edit_manifest(bundle, artifact=artifact)
    with pytest.raises(BundleError, match="relative path inside the bundle") as info:
        verify_bundle(bundle)
    assert repr(artifact) in str(info.value)


def test_artifact_pointing_at_another_listed_file_is_refused(bundle):
    _edit_manifest(bundle, artifact="source/model.fp32.onnx")
    with pytest.raises(BundleError, match=r"artifact 'source/model.fp32.onnx' is not the onnxruntime model of Triton model 'tiny'"):
        load_bundle(bundle)


def test_precision_edited_to_int8_on_a_float_graph_is_refused(bundle):
    _edit_manifest(bundle, precision="int8")
    with pytest.raises(BundleError, match=r"precision 'int8' but 'model_repository/tiny/1/model.onnx' holds no QuantizeLinear"):
        verify_bundle(bundle)


def test_model_name_edited_is_refused(bundle):
    _edit_manifest(bundle, name="other")
    with pytest.raises(BundleError, match="Triton model 'other'"):
        verify_bundle(bundle)


@pytest.mark.parametrize("extra", ["model_repository/tiny/2", "model_repository/ghost"])
def test_extra_triton_folder_is_refused_by_name(bundle, extra):
    (bundle / extra).mkdir()  # empty: no file, so no checksum notices it, but Triton would serve it
    with pytest.raises(BundleError) as info:
        verify_bundle(bundle)
    assert Path(extra).name in str(info.value)
    assert main(["inspect", str(bundle)]) == 2


# -- the bytes verified are the bytes loaded -------------------------------------------------------
def test_swap_between_verification_and_load_does_not_reach_the_runtime(bundle, graphs, monkeypatch):
    expected = _torch_out(1.0)
    assert not np.allclose(expected, _torch_out(-3.0), atol=1e-3)  # the swapped graph computes something else
    original = OnnxRuntimeBackend.load_bytes

    def swap_then_load(self, data, **kw):  # an attacker replaces the file right after it was hashed
        (bundle / ARTIFACT).write_bytes(graphs[1].read_bytes())
        return original(self, data, **kw)

    monkeypatch.setattr(OnnxRuntimeBackend, "load_bytes", swap_then_load)
    runner = load_bundle(bundle)
    assert (bundle / ARTIFACT).read_bytes() == graphs[1].read_bytes()  # the swap happened
    np.testing.assert_allclose(_run(runner), expected, atol=1e-5)
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bundle)


def test_backend_without_load_bytes_gets_a_private_copy_of_the_verified_bytes(bundle, graphs, monkeypatch):
    expected = _torch_out(1.0)
    monkeypatch.delattr(OnnxRuntimeBackend, "load_bytes")
    original_load = OnnxRuntimeBackend.load
    seen = []

    def load_and_swap(self, path, **kw):
        seen.append(Path(path))
        (bundle / ARTIFACT).write_bytes(graphs[1].read_bytes())
        return original_load(self, path, **kw)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load_and_swap)
    runner = load_bundle(bundle)
    assert seen and not seen[0].is_relative_to(bundle)
    assert oct(seen[0].parent.stat().st_mode & 0o777) == oct(0o700)
    np.testing.assert_allclose(_run(runner), expected, atol=1e-5)

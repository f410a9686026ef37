"""Serving bundle: Triton config parsed against Triton's ModelConfig, checksums, tampering, atomic writes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploycompress.backends.base import TensorSpec
from deploycompress.bundle import (
    BundleError,
    Manifest,
    atomic_output_dir,
    collect_environment,
    load_bundle,
    triton_config,
    verify_bundle,
    write_bundle,
)
from deploycompress.zoo import DigitsNet

import tritonclient  # noqa: E402  (test extra)

SPEC_IN = [TensorSpec("input", ("batch", 1, 8, 8), "float32")]
SPEC_OUT = [TensorSpec("logits", ("batch", 10), "float32")]


def model_config_message():
    """Triton's ModelConfig message, loaded from the module file tritonclient ships (its grpc package
    would import grpcio, which the message itself does not need)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


def parse_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_message()())


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = DigitsNet(width=8).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch.onnx.export(
        model, (torch.randn(2, 1, 8, 8),), str(path), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    return path, model


@pytest.fixture()
def bundle(tmp_path, digits_onnx) -> Path:
    path, _ = digits_onnx
    out = tmp_path / "bundle"
    write_bundle(out, name="digits", backend="onnxruntime", artifact=path, precision="fp32", inputs=SPEC_IN, outputs=SPEC_OUT,
                 extra_files={"source/model.fp32.onnx": path}, max_batch_size=16)
    return out


def test_config_pbtxt_parses_as_triton_model_config(bundle):
    text = (bundle / "model_repository" / "digits" / "config.pbtxt").read_text()
    cfg = parse_config(text)
    assert cfg.name == "digits" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 16
    assert [(t.name, list(t.dims)) for t in cfg.input] == [("input", [1, 8, 8])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [10])]
    assert cfg.input[0].data_type == model_config_message().DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
        "data_type"].enum_type.values_by_name["TYPE_FP32"].number
    assert cfg.HasField("dynamic_batching")
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1
    assert cfg.instance_group[0].kind == 2  # KIND_CPU
    assert (bundle / "model_repository" / "digits" / "1" / "model.onnx").is_file()


def test_unbatched_model_gets_full_dims_and_no_dynamic_batching():
    cfg = parse_config(triton_config("m", "tensorrt", [TensorSpec("x", (1, 3, -1), "float16")], [TensorSpec("y", (1, 5), "int64")]))
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
    assert list(cfg.input[0].dims) == [1, 3, -1] and list(cfg.output[0].dims) == [1, 5]
    assert not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == 1  # KIND_GPU


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "bad name"}, "not a valid Triton model name"),
        ({"backend": "tvm"}, "backend 'tvm' has no Triton platform"),
        ({"inputs": [TensorSpec("x", ("batch", 2), "complex64")]}, "input 'x': dtype 'complex64'"),
    ],
)
def test_triton_config_rejects_bad_input(kwargs, message):
    args = {"name": "m", "backend": "onnxruntime", "inputs": SPEC_IN, "outputs": SPEC_OUT} | kwargs
    with pytest.raises(BundleError, match=message):
        triton_config(**args)


def test_manifest_lists_every_file_with_its_sha256(bundle):
    manifest = verify_bundle(bundle)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest.files) == on_disk
    import hashlib

    for rel, digest in manifest.files.items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == digest
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["version"] == 1 and raw["precision"] == "fp32" and raw["backend"] == "onnxruntime"
    assert raw["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert raw["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert raw["environment"]["versions"]["onnx"] == onnx.__version__
    assert raw["environment"]["host"]["cpu"]
    assert raw["artifact"] == "model_repository/digits/1/model.onnx"
    assert raw["created"].endswith("+00:00")
    assert Manifest.from_dict(raw).to_dict() == raw


def test_load_bundle_runs_the_model(bundle, digits_onnx):
    _, model = digits_onnx
    runner = load_bundle(bundle)
    x = torch.rand(5, 1, 8, 8)
    out = runner.run({"input": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(next(iter(out.values())), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tamper", ["modify", "delete", "add"])
def test_tampered_bundle_is_refused(bundle, tamper):
    target = bundle / "model_repository" / "digits" / "1" / "model.onnx"
    if tamper == "modify":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = r"checksum mismatch .*model_repository/digits/1/model.onnx"
    elif tamper == "delete":
        target.unlink()
        expected = r"missing: \['model_repository/digits/1/model.onnx'\]"
    else:
        (bundle / "model_repository" / "digits" / "2").mkdir()
        (bundle / "model_repository" / "digits" / "2" / "model.onnx").write_bytes(b"x")
        expected = r"not in the manifest: \['model_repository/digits/2/model.onnx'\]"
    with pytest.raises(BundleError, match=expected):
        load_bundle(bundle)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_non_empty_and_overwrites_on_request(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(BundleError, match="is not empty; pass overwrite=True"):
        with atomic_output_dir(out):
            pytest.fail("the block must not run")
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_records_the_gpu_or_none():
    env = collect_environment()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        assert env["gpu"]["compute_capability"] == f"{major}.{minor}"
    else:
        assert env["gpu"] is None
    assert env["versions"]["onnxruntime"] == importlib.metadata.version("onnxruntime")
    assert env["versions"]["tensorrt"] == (importlib.metadata.version("tensorrt") if _has_dist("tensorrt") else None)


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False

"""The real ``deploycompress`` command in a subprocess: build, profile, validate, inspect, bad input.

Each subprocess pays the torch import (~5 s), so the cases are few and share one bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deploycompress as dc
from deploycompress.zoo import DigitsNet

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "deploycompress.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A random-weight DigitsNet (state dict), L1 masks, calibration and evaluation data on disk."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = DigitsNet()
    torch.save(model.state_dict(), d / "weights.pt")
    pruner = dc.L1NormPruner(model, [{"op_names": ["conv2"], "sparsity": 0.5}])
    _, masks = pruner.compress()
    dc.save_masks(masks, d / "masks.pt")
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.random((64, 1, 8, 8), dtype=np.float32))
    np.savez(d / "eval.npz", x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    return {"dir": d, "weights": d / "weights.pt", "masks": d / "masks.pt", "calib": d / "calib.npy", "eval": d / "eval.npz"}


@pytest.fixture(scope="module")
def bundle(inputs) -> tuple[Path, dict]:
    out = inputs["dir"] / "bundle"
    proc = cli("build", "--model", "deploycompress.zoo.digits:DigitsNet", "--weights", str(inputs["weights"]),
               "--masks", str(inputs["masks"]), "--calib-data", str(inputs["calib"]), "--eval-data", str(inputs["eval"]),
               "--input-shape", "1,1,8,8", "--precision", "int8", "--iterations", "10", "--name", "tiny", "--out", str(out), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_build_writes_a_verified_bundle(bundle):
    out, result = bundle
    assert result["out_dir"] == str(out)
    manifest = dc.verify_bundle(out)
    assert manifest.name == "tiny" and manifest.precision == "int8"
    assert result["manifest"]["files"] == manifest.files
    assert (out / "model_repository" / "tiny" / "config.pbtxt").is_file()
    report = result["report"]
    assert [(r["precision"], r["batch_size"]) for r in report["latency"]] == [("fp32", 1), ("int8", 1)]
    assert {s["stage"] for s in report["sizes"]} >= {"original", "speeded up"}


def test_profile_prints_the_performance_summary(bundle):
    out, _ = bundle
    proc = cli("profile", str(out), "--batch-sizes", "1,4", "--iterations", "20", "--layers", "3", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["batch_size"] for r in data["latency"]] == [1, 4]
    for r in data["latency"]:
        assert r["iterations"] == 20 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert len(data["layers"]) == 3 and all(l["mean_ms"] >= 0 for l in data["layers"])


def test_validate_passes_and_fails_by_tolerance(bundle, inputs):
    out, _ = bundle
    ok = cli("validate", str(out), "--data", str(inputs["eval"]), "--min-cosine", "0.99", "--json", "-q")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["passed"] and data["reference"] == "bundle fp32 onnx" and data["accuracy"]["cosine_similarity"] > 0.99
    strict = cli("validate", str(out), "--data", str(inputs["eval"]), "--max-abs-error", "0", "-q")
    assert strict.returncode == 1
    assert "FAILED: max |diff|" in strict.stdout and "> --max-abs-error 0" in strict.stdout
    assert "Performance summary: onnxruntime int8, batch 1" in strict.stdout and "percentile(99%)" in strict.stdout


def test_inspect_shows_ops_qdq_and_lint(bundle):
    out, _ = bundle
    proc = cli("inspect", str(out), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert data["qdq_nodes"] > 0 and data["lint"]["target"] == "tensorrt"
    assert isinstance(data["lint"]["findings"], list)


@pytest.mark.parametrize(
    "case",
    ["missing_module", "non_empty_out", "tampered_bundle", "bad_recipe"],
)
def test_bad_input_exits_2_with_a_message(case, bundle, inputs, tmp_path):
    if case == "missing_module":
        proc = cli("build", "--model", "no_such_pkg.models:make", "--input-shape", "1,1,8,8", "--precision", "fp32", "--out", str(tmp_path / "o"))
        expected = "--model 'no_such_pkg.models:make': cannot import module 'no_such_pkg.models'"
    elif case == "non_empty_out":
        proc = cli("build", "--model", "deploycompress.zoo.digits:DigitsNet", "--input-shape", "1,1,8,8", "--precision", "fp32",
                   "--out", str(inputs["dir"]))
        expected = "is not empty; pass overwrite=True (CLI: --force)"
    elif case == "tampered_bundle":
        copy = tmp_path / "b"
        import shutil

        shutil.copytree(bundle[0], copy)
        (copy / "report.json").write_text("{}")
        proc = cli("profile", str(copy))
        expected = "checksum mismatch (file modified after the bundle was written): ['report.json']"
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("model: {factory: 'deploycompress.zoo.digits:DigitsNet'}\nprune: {pruner: L1NormPruner, config_list: [{op_types: [Conv2d], sparsity: 0.5}]}\nqantize: {}\n")
        proc = cli("build", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
        expected = "unknown key 'qantize' (did you mean 'quantize'?)"
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert expected in proc.stderr
    assert not (tmp_path / "o").exists()


def test_two_input_model_from_the_command_line(tmp_path):
    """--input-shape once per input (named), .npz data keyed by input name, every output validated."""
    rng = np.random.default_rng(0)
    data = {"rgb": rng.random((32, 3, 16, 16), dtype=np.float32), "depth": rng.random((32, 1, 16, 16), dtype=np.float32)}
    np.savez(tmp_path / "calib.npz", **data)
    np.savez(tmp_path / "eval.npz", **data, y=rng.integers(0, 5, 32))
    env_tests = str(ROOT / "tests")
    out = tmp_path / "b"
    proc = cli("build", "--model", "conformance_models:TwoInputFusion", "--input-shape", "rgb=1,3,16,16", "--input-shape",
               "depth=1,1,16,16", "--calib-data", str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "eval.npz"),
               "--iterations", "5", "--out", str(out), "--json", "-q", cwd=Path(env_tests))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads(proc.stdout)["manifest"]
    assert [i["name"] for i in manifest["inputs"]] == ["rgb", "depth"]
    assert 'name: "depth"' in (out / "model_repository" / "twoinputfusion" / "config.pbtxt").read_text()
    proc = cli("validate", str(out), "--data", str(tmp_path / "eval.npz"), "--reference", "conformance_models:TwoInputFusion",
               "--json", "-q", cwd=Path(env_tests))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout)["outputs"]) == {"output"}


def test_token_inputs_with_a_dynamic_sequence_axis(tmp_path):
    """Integer ids and a mask from --input-shape with dtypes; --dynamic-axis makes the sequence length free."""
    out = tmp_path / "b"
    proc = cli("build", "--model", "conformance_models:TinyEncoder", "--input-shape", "ids=2,8:int64", "--input-shape", "mask=2,8:int64",
               "--dynamic-axis", "ids=1:sequence", "--dynamic-axis", "mask=1:sequence", "--precision", "fp32", "--iterations", "3",
               "--out", str(out), "--json", "-q", cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    inputs = json.loads(proc.stdout)["manifest"]["inputs"]
    assert inputs == [{"name": "ids", "shape": ["batch", "sequence"], "dtype": "int64"},
                      {"name": "mask", "shape": ["batch", "sequence"], "dtype": "int64"}]
    runner = dc.load_bundle(out)
    ids = np.arange(26, dtype=np.int64).reshape(2, 13) % 32
    got = runner.run({"ids": ids, "mask": np.ones_like(ids)})["output"]
    assert got.shape == (2, 5)

"""A scheduled pruner reached from the recipe YAML through the real ``deploycompress build`` command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

import deploycompress as dc

ROOT = Path(__file__).resolve().parents[1]


def test_agp_from_a_recipe_builds_a_smaller_bundle_and_writes_its_history(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {factory: 'deploycompress.zoo.digits:DigitsNet'}\n"
        "input_shape: [1, 1, 8, 8]\n"
        "prune:\n"
        "  pruner: AGPPruner\n"
        "  config_list: [{op_names: [conv2], sparsity: 0.5}]\n"
        "  options: {pruning_algorithm: l1, total_iteration: 3}\n"
        f"  report: {tmp_path / 'search'}\n"
        "build: {precision: fp32, iterations: 3}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "deploycompress.cli", "build", "--recipe", str(recipe), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "search" / "pruning_history.json").read_text())
    assert [r["task_id"] for r in history] == [1, 2, 3]
    # the same history travels in the bundle, listed with its sha256 in the manifest
    inside = tmp_path / "o" / "pruning" / "pruning_history.json"
    assert json.loads(inside.read_text()) == history
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["files"]["pruning/pruning_history.json"] == hashlib.sha256(inside.read_bytes()).hexdigest()
    dc.bundle.verify_bundle(tmp_path / "o")
    onnx_file = next((tmp_path / "o").rglob("model.onnx"))
    model = onnx.load(str(onnx_file))
    shapes = sorted(numpy_helper.to_array(t).shape for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    # DigitsNet(32): conv2 64 -> 32 filters, and conv3 reads 32 channels instead of 64
    assert (32, 32, 3, 3) in shapes and (64, 32, 3, 3) in shapes and (64, 64, 3, 3) not in shapes


def test_recipe_options_are_checked_before_work():
    from deploycompress.zoo import DigitsNet

    with pytest.raises(ValueError, match="not arguments of AGPPruner"):
        dc.pruning.make_recipe_pruner(DigitsNet(), {"pruner": "AGPPruner", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
                                                    "options": {"pruning_algorithm": "l1", "total_iteration": 2, "epochs": 3}}, None, None)  # fmt: skip
    with pytest.raises(ValueError, match="is not a pruner"):
        dc.pruning.make_recipe_pruner(DigitsNet(), {"pruner": "Nope", "config_list": []}, None, None)


def test_search_report_goes_into_the_bundle(tmp_path):
    """An automatic pruner from the recipe: its trajectory plot and history JSON are bundle files."""
    (tmp_path / "recipe_funcs.py").write_text(
        "import torch\n"
        "def score(model):\n"
        "    torch.manual_seed(0)\n"
        "    x = torch.randn(16, 1, 8, 8)\n"
        "    with torch.no_grad():\n"
        "        return float(model(x).std())\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {factory: 'deploycompress.zoo.digits:DigitsNet'}\n"
        "input_shape: [1, 1, 8, 8]\n"
        "prune:\n"
        "  pruner: SimulatedAnnealingPruner\n"
        "  config_list: [{op_names: [conv2, conv3], total_sparsity: 0.5}]\n"
        "  options: {evaluator: 'recipe_funcs:score', cool_down_rate: 0.5, pruning_algorithm: l1}\n"
        "build: {precision: fp32, iterations: 3}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "deploycompress.cli", "build", "--recipe", str(recipe), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "o"
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in ("pruning/pruning_history.json", "pruning/pruning_trajectory.png"):
        assert manifest["files"][rel] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    assert (out / "pruning/pruning_trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "pruning/pruning_history.json").read_text())
    assert history["metric"] == "sparsity" and len(history["candidates"]) == 3  # 100 -> 50 -> 25 -> (12.5 < 20)
    dc.bundle.verify_bundle(out)

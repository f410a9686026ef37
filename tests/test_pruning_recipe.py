"""A scheduled pruner reached from the recipe YAML through the real ``deploycompress build`` command."""

from __future__ import annotations

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

"""Residual blocks written as torchvision writes them (``out += identity`` in place, one ReLU module reused)
run fully in int8 on onnxruntime through build_engine's default calibration."""

import collections
import copy

import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

import deploycompress as dc
from deploycompress.engine import default_quant_config


def _optimized_ops(path, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_batchnorm_before_an_in_place_residual_add_is_calibrated():
    """bn3's output is read by the (in-place) Add, not by the ReLU module after it: its output is calibrated."""
    model = torchvision.models.resnet50(weights=None).eval()
    names = {n for c in default_quant_config(model, torch.randn(1, 3, 32, 32)) if "output" in c["quant_types"] for n in c.get("op_names", [])}
    blocks = [n for n, m in model.named_modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16
    assert {f"{b}.bn3" for b in blocks} <= names, sorted({f"{b}.bn3" for b in blocks} - names)
    # bn1/bn2 feed the ReLU module: folded into the conv, their output quantized after the ReLU instead
    assert not {f"{b}.bn1" for b in blocks} & names


def test_resnet18_runs_every_conv_and_residual_add_in_int8(tmp_path):
    """resnet18 has 20 convs (stem, 16 in the blocks, 3 downsample) and 8 residual Adds."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs == 20
    x = torch.randn(16, 3, 32, 32)
    art = dc.build_engine(copy.deepcopy(model), example_inputs=x[:1], out_dir=tmp_path / "b", calib_data=list(x.split(8)),
                          eval_inputs=x[:2], iterations=1, warmup=0, compare_fp32=False, progress=False)  # fmt: skip
    ops = _optimized_ops(art.out_dir / "source" / "model.qdq.onnx", tmp_path)
    assert (ops["QLinearConv"], ops["QLinearAdd"], ops["Conv"], ops["Add"]) == (convs, 8, 0, 0), ops
    # one Q for the graph input; no DequantizeLinear left between int8 kernels (the logits come out of QGemm)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0, ops

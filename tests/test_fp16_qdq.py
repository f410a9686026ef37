"""The mixed int8 + fp16 graph for TensorRT 11's strongly typed builds: Q/DQ with fp16 scales need opset 19
(QuantizeLinear/DequantizeLinear take float16 from opset 19 on), so ``to_fp16`` converts a QDQ graph's opset
first. Oracles: the ONNX checker, the types read back from the graph, onnxruntime against PyTorch fp32."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from torch import nn

from deploycompress.engine import default_quant_config
from deploycompress.export import insert_qdq, lint_qdq, to_fp16, to_onnx
from deploycompress.export.fp16 import QDQ_FP16_OPSET
from deploycompress.quantization import PTQQuantizer


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.norm = nn.GroupNorm(4, 16)  # kept in fp32 inside the fp16 graph
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.conv2(self.conv1(x)))
        return self.fc(self.norm(x).mean((2, 3)))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_the_mixed_graph_is_opset_19_with_fp16_scales_and_runs_close_to_fp32():
    torch.manual_seed(0)
    model = _Residual().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    q = PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    q.calibrate(calib)
    exported = to_onnx(model, calib[0][:1])
    qdq = insert_qdq(exported.model, q.export_calib_config(), exported.name_map, target="tensorrt")
    assert next(o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")) < QDQ_FP16_OPSET

    mixed = to_fp16(qdq)
    onnx.checker.check_model(mixed, full_check=True)
    assert next(o.version for o in mixed.opset_import if o.domain in ("", "ai.onnx")) >= QDQ_FP16_OPSET
    inits = {i.name: i for i in mixed.graph.initializer}
    nodes = list(mixed.graph.node)
    qs = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert qs and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in qs)
    assert all(inits[n.input[2]].data_type == TensorProto.INT8 for n in qs)
    producer = {o: n for n in nodes for o in n.output}
    for conv in (n for n in nodes if n.op_type == "Conv"):  # no Cast between a DQ and its conv
        assert producer[conv.input[0]].op_type == "DequantizeLinear" and producer[conv.input[1]].op_type == "DequantizeLinear"
    assert any(n.op_type == "GroupNormalization" or n.op_type == "InstanceNormalization" for n in nodes)  # kept fp32
    assert [f for f in lint_qdq(mixed, "tensorrt") if f.severity == "error"] == []
    assert mixed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # inputs and outputs stay fp32

    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    int8_fp32 = _run(qdq, x.numpy())
    out = _run(mixed, x.numpy())
    assert out.dtype == np.float32
    # stated tolerance: the mixed graph is as close to PyTorch fp32 as the fp32 int8 graph, give or take fp16
    # rounding: cosine >= 0.99 and max abs error <= 2x the int8 graph's plus 1 % of the logits' range
    assert _cos(out, ref) >= 0.99
    err, err_int8 = np.abs(out - ref).max(), np.abs(int8_fp32 - ref).max()
    assert 0 < err <= 2 * err_int8 + 0.01 * np.abs(ref).max(), (err, err_int8)

"""A bias too large for int32 at its scale (tiny weights, large bias) saturates at the int32 bound instead of
wrapping to the opposite sign."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from deploycompress.export import insert_qdq, to_onnx
from deploycompress.quantization import PTQQuantizer


def test_huge_int32_bias_saturates_with_its_sign():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[0].fill_(1e-9)  # channel 0: scale ~1e-11, its bias 1e3 needs ~1e14 levels
        model[0].bias.copy_(torch.tensor([1e3, 0.1]))
    x = torch.rand(4, 3, 5, 5)
    quantizer = PTQQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"], "quant_bits": 8}])
    quantizer.calibrate([x])
    calib = quantizer.export_calib_config()
    quantizer.unwrap_model()
    exported = to_onnx(model, x[:1])
    q = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    biases = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT32 and t.dims == [2]]
    assert biases, "no int32 bias in the QDQ graph"
    assert biases[0][0] == 2**31 - 1  # saturated, positive like the float bias (it wrapped to -2**31 before)

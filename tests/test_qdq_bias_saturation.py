"""A bias too large for int32 at its scale (tiny weights, large bias): the weight scale of that channel is
widened until the bias fits (onnxruntime's quantizer does the same); before, it saturated at the int32 bound
(and before that wrapped to the opposite sign)."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from deploycompress.export import insert_qdq, to_onnx
from deploycompress.export.qdq import BiasRangeWarning
from deploycompress.quantization import PTQQuantizer


def test_huge_int32_bias_is_held_by_a_widened_weight_scale():
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
    with pytest.warns(BiasRangeWarning, match=r"1 of 2 channel\(s\) of Conv"):
        q = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    biases = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT32 and t.dims == [2]]
    assert biases, "no int32 bias in the QDQ graph"
    scales = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_bias_scale")]
    held = biases[0].astype(np.float64) * scales[0].astype(np.float64)
    assert 0 < biases[0][0] < 2**31 - 1  # positive like the float bias, not saturated
    assert np.all(np.abs(held - [1e3, 0.1]) <= scales[0] * 0.51)  # each bias within half its own step

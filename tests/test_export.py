"""to_onnx and its name map: every match checked against weights, op types and shapes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploycompress.export import ExportError, NameMapError, to_onnx
from deploycompress.export.name_map import build_name_map
from deploycompress.zoo import DigitsNet


class Branchy(nn.Module):
    """Residual Add, Concat, ConvTranspose and Linear: every mapping case in one small net."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.conv4, self.relu3, self.relu4 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.ReLU()
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + x)
        x = torch.cat([self.relu3(self.conv3(x)), self.relu4(self.conv4(x))], 1)
        return self.fc(torch.flatten(self.pool(self.up(x)), 1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def branchy():
    model = _randomise_bn(Branchy())
    return model, to_onnx(model, torch.randn(2, 3, 8, 8))


def _ort_run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_export_runs_with_dynamic_batch_and_matches_torch(branchy):
    model, res = branchy
    assert res.inputs[0].shape == ("batch", 3, 8, 8) and res.outputs[0].shape == ("batch", 5)
    x = torch.randn(5, 3, 8, 8)
    np.testing.assert_allclose(_ort_run(res.model, x.numpy()), model(x).detach().numpy(), atol=1e-4)


def test_name_map_weights_axes_and_folded_batchnorms(branchy):
    model, res = branchy
    nm = res.name_map
    inits = {i.name: i for i in res.model.graph.initializer}
    conv1 = nm["conv1"]
    assert conv1.op_types == ("Conv",) and conv1.inputs == ["x"] and conv1.weight_axis == 0
    assert tuple(inits[conv1.weight].dims) == (8, 3, 3, 3)
    # bn1 was folded into conv1: the per-channel factor is bn1's gamma / sqrt(var + eps)
    bn = model.bn1
    expected = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    np.testing.assert_allclose(conv1.weight_fold, expected, rtol=1e-5)
    assert nm["bn1"].folded_into == "conv1" and conv1.folded == ["bn1"]
    assert nm["bn1"].outputs == ["/conv1/Conv_output_0"] and conv1.outputs == []
    assert nm["conv3"].weight_fold is None  # no BatchNorm: the initializer is the module's weight
    assert nm["up"].op_types == ("ConvTranspose",) and nm["up"].weight_axis == 1
    assert nm["fc"].op_types == ("Gemm",) and nm["fc"].weight == "fc.weight" and nm["fc"].weight_axis == 0
    assert nm["relu2"].inputs == ["/Add_output_0"]
    concat = next(n for n in res.model.graph.node if n.op_type == "Concat")
    assert list(concat.input) == [nm["relu3"].outputs[0], nm["relu4"].outputs[0]]
    assert set(nm.to_dict()["modules"]) == set(nm)


def test_reused_module_maps_one_tensor_per_call():
    res = to_onnx(DigitsNet(width=4).eval(), torch.randn(1, 1, 8, 8))
    relu = res.name_map["relu"]
    assert len(relu.inputs) == len(relu.outputs) == 4  # DigitsNet calls its one ReLU four times
    assert len(set(relu.outputs)) == 4


def test_linear_on_sequences_maps_to_matmul_with_axis_1():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    res = to_onnx(model, torch.randn(2, 3, 6))
    assert "MatMul" in res.name_map["0"].op_types and res.name_map["0"].weight_axis == 1


def test_map_verification_rejects_a_graph_of_other_weights(branchy):
    model, res = branchy
    other = _randomise_bn(Branchy())
    other.fc.weight.data.add_(1.0)
    with pytest.raises(NameMapError, match="'conv1'|'fc'"):
        build_name_map(other, (torch.randn(2, 3, 8, 8),), res.model)


def test_unknown_module_error_names_it(branchy):
    _, res = branchy
    with pytest.raises(NameMapError, match="'nope'"):
        res.name_map.require("nope")


def test_unsupported_operator_is_named():
    class SVD(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[0]

    with pytest.raises(ExportError, match="aten::linalg_svd"):
        to_onnx(SVD(), torch.randn(2, 4, 4))


def test_old_opset_is_refused():
    with pytest.raises(ExportError, match="opset 11"):
        to_onnx(nn.Linear(2, 2), torch.randn(1, 2), opset=11)

"""The tensorrt QDQ target on real topologies: S8 symmetric everywhere, the residual Add's shortcut input
quantized (TensorRT fuses the Add into the conv), one Concat scale; lint and TensorRT checks clean.
Oracles: the graph structure and values read back from the ONNX here."""

from __future__ import annotations

import copy

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from deploycompress.engine import default_quant_config
from deploycompress.export import check_tensorrt, insert_qdq, lint_qdq, to_onnx
from deploycompress.quantization import PTQQuantizer


def _qdq(model: nn.Module, x: torch.Tensor):
    model = model.eval()
    q = PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    q.calibrate([x])
    exported = to_onnx(model, x[:1])
    return insert_qdq(exported.model, q.export_calib_config(), exported.name_map, target="tensorrt")


def _producer(t):
    return t.inputs[0] if t.inputs else None


class _Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Conv2d(18, 5, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x)), self.pool(x)], 1)
        return self.head(y).mean((2, 3))


@pytest.fixture(scope="module")
def resnet18_qdq():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return _qdq(torchvision.models.resnet18(num_classes=10), torch.randn(8, 3, 64, 64))


def test_every_zero_point_is_int8_zero_and_weights_are_per_channel(resnet18_qdq):
    g = gs.import_onnx(resnet18_qdq)
    qdq = [n for n in g.nodes if n.op in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = np.asarray(n.inputs[2].values)
        assert zp.dtype == np.int8 and not zp.any(), n.name
    for conv in (n for n in g.nodes if n.op == "Conv"):
        dq = _producer(conv.inputs[1])
        w, s = np.asarray(dq.inputs[0].values), np.asarray(dq.inputs[1].values)
        assert w.dtype == np.int8 and s.shape == (w.shape[0],) and dq.attrs.get("axis", 1) == 0


def test_residual_adds_quantize_the_shortcut_and_leave_the_conv_output_float(resnet18_qdq):
    g = gs.import_onnx(resnet18_qdq)
    adds = [n for n in g.nodes if n.op == "Add"]
    assert len(adds) == 8
    identity_blocks = 0
    for add in adds:
        dq = [i for i in add.inputs if _producer(i) is not None and _producer(i).op == "DequantizeLinear"]
        assert len(dq) == 1, add.name  # exactly one input quantized: the other is the fused conv's output
        other = next(i for i in add.inputs if i is not dq[0])
        assert _producer(other).op in ("Conv",), add.name  # the branch: conv (BN folded) output, float
        q = _producer(_producer(dq[0]).inputs[0])
        src = _producer(q.inputs[0])
        if src.op != "Conv":  # identity block: the shortcut is the block input (a Relu), not a conv
            identity_blocks += 1
        else:  # downsample block: the 1x1 shortcut conv is quantized, the main branch's conv2 fuses the Add
            assert "downsample" in src.name and "conv2" in _producer(other).name, add.name
    assert identity_blocks == 5
    assert lint_qdq(resnet18_qdq, "tensorrt") == [] and check_tensorrt(resnet18_qdq).errors == []


def test_concat_inputs_share_one_scale():
    torch.manual_seed(0)
    model = _qdq(_Inception(), torch.randn(8, 3, 16, 16))
    g = gs.import_onnx(model)
    (cat,) = [n for n in g.nodes if n.op == "Concat"]
    scales = []
    for i in cat.inputs:
        dq = _producer(i)
        assert dq is not None and dq.op == "DequantizeLinear", i.name
        scales.append(float(np.asarray(dq.inputs[1].values)))
    assert len(set(scales)) == 1
    assert lint_qdq(model, "tensorrt") == [] and check_tensorrt(model).errors == []


class _TwoInputsDictOut(nn.Module):
    """Two inputs; a feature map that is both a graph output and a conv's input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, y):
        feat = torch.relu(self.a(x)) + torch.relu(self.b(y))
        return {"logits": self.head(feat).mean((2, 3)), "feat": feat}


def test_a_graph_output_read_by_a_weighted_op_is_quantized_for_that_reader_only():
    torch.manual_seed(0)
    model = _TwoInputsDictOut().eval()
    x, y = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    q = PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    q.calibrate([(x, y)])
    exported = to_onnx(model, (x[:1], y[:1]))
    qdq = insert_qdq(exported.model, q.export_calib_config(), exported.name_map, target="tensorrt")
    g = gs.import_onnx(qdq)
    (gemm,) = [n for n in g.nodes if n.op == "Conv" and "head" in n.name]
    assert _producer(gemm.inputs[0]).op == "DequantizeLinear"
    feat_out = g.outputs[1]
    assert _producer(feat_out).op == "Add"  # the graph output itself stays float
    assert lint_qdq(qdq, "tensorrt") == []
    import onnxruntime as ort

    outs = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {i.name: v.numpy() for i, v in zip(qdq.graph.input, (x, y))})
    with torch.no_grad():
        ref = model(x, y)
    # the convs ran on quantized inputs, so the feature differs from fp32 by their rounding only; had the
    # output itself been quantized it would sit on the int8 grid of its scale
    np.testing.assert_allclose(outs[1], ref["feat"].numpy(), atol=0.05)
    scale = float(np.asarray(_producer(gemm.inputs[0]).inputs[1].values))
    steps = outs[1] / scale
    assert np.abs(steps - np.round(steps)).max() > 0.1


def test_a_module_called_twice_gives_each_tensor_its_own_range():
    """resnet's BasicBlock applies one ReLU module twice (after bn1, after the Add): its calibration is the
    union of both calls, but conv2 reads the first call alone, so conv2's input scale is that tensor's
    own max / 127 (computed here in PyTorch), not the union's."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    seen = {}
    block = model.layer1[1]
    hooks = [block.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("first", torch.relu(o).abs().max().item())),
             block.register_forward_hook(lambda m, i, o: seen.__setitem__("second", o.abs().max().item()))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert seen["second"] > 1.2 * seen["first"]  # the union would widen the first tensor's scale
    g = gs.import_onnx(_qdq(model, x))
    (conv2,) = [n for n in g.nodes if n.op == "Conv" and n.name == "/layer1/layer1.1/conv2/Conv"]
    dq = _producer(conv2.inputs[0])
    assert dq.op == "DequantizeLinear"
    assert float(np.asarray(dq.inputs[1].values)) == pytest.approx(seen["first"] / 127, rel=1e-5)


class _HeadAndTokens(nn.Module):
    """A token MatMul (rows per sample: 4) and a pooled classifier head (one row per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tokens = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = torch.relu(self.conv(x)).flatten(2)[:, :, :4].transpose(1, 2)  # (N, 4, 8)
        return self.fc(torch.relu(self.tokens(t)).mean(1))


def test_the_classifier_gemv_stays_float_and_says_so():
    from deploycompress.export import CalibrationSkippedWarning, skipped_calibration

    torch.manual_seed(0)
    model = _HeadAndTokens().eval()
    x = torch.randn(8, 3, 6, 6)
    with pytest.warns(CalibrationSkippedWarning, match="fc.weight.*matrix-vector"):
        qdq = _qdq(model, x)
    g = gs.import_onnx(qdq)
    (fc,) = [n for n in g.nodes if n.op == "Gemm"]
    assert gs.Constant == type(fc.inputs[1]) and _producer(fc.inputs[0]).op != "DequantizeLinear"
    (mm,) = [n for n in g.nodes if n.op == "MatMul"]  # (N, 4, 8) x (8, 8): a GEMM, quantized
    assert _producer(mm.inputs[0]).op == "DequantizeLinear" and _producer(mm.inputs[1]).op == "DequantizeLinear"
    assert [s["module"] for s in skipped_calibration(qdq)] == ["fc"]
    assert lint_qdq(qdq, "tensorrt") == [] and check_tensorrt(qdq).errors == []
    # onnxruntime target: unchanged, the head is quantized
    q = PTQQuantizer(copy.deepcopy(model), default_quant_config(model))
    q.calibrate([x])
    exported = to_onnx(model, x[:1])
    ort_graph = gs.import_onnx(insert_qdq(exported.model, q.export_calib_config(), exported.name_map, target="onnxruntime"))
    (fc,) = [n for n in ort_graph.nodes if n.op == "Gemm"]
    assert _producer(fc.inputs[1]).op == "DequantizeLinear"


class _PadThenConv(nn.Module):
    """Conv -> ReLU6 -> F.pad -> depthwise Conv (EfficientNet-Lite's static "same" padding), the input padded too."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU6()
        self.b = nn.Conv2d(8, 8, 3, groups=8)

    def forward(self, x):
        x = self.a(nn.functional.pad(x, (1, 1, 1, 1)))
        return self.b(nn.functional.pad(self.act(x), (0, 1, 0, 1))).mean((2, 3))


def test_a_tensor_only_padded_into_a_conv_is_quantized_once_after_the_pad():
    """TensorRT target: ``ReLU6 -> Pad -> Conv`` carries one Q/DQ, on the Pad's output (the conv's own input), not a
    second pair before the Pad; the graph input likewise. The values: the pair after the Pad uses the ReLU6 output's
    own max / 127 (computed here in PyTorch), and onnxruntime's result equals the fake-quant computed here."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _PadThenConv().eval()
    x = torch.randn(8, 3, 12, 12)
    g = gs.import_onnx(qdq := _qdq(model, x))
    pads = [n for n in g.nodes if n.op == "Pad"]
    assert len(pads) == 2
    for pad in pads:
        assert _producer(pad.inputs[0]) is None or _producer(pad.inputs[0]).op != "DequantizeLinear", pad.name
        (q,) = pad.outputs[0].outputs
        assert q.op == "QuantizeLinear"
    assert sum(n.op == "QuantizeLinear" for n in g.nodes) == 2
    assert lint_qdq(qdq, "tensorrt") == [] and check_tensorrt(qdq).errors == []

    def fq(t: torch.Tensor, scale) -> torch.Tensor:
        s = torch.as_tensor(scale, dtype=torch.float32)
        return torch.clamp(torch.round(t / s), -128, 127) * s

    def wq(w: torch.Tensor) -> torch.Tensor:
        s = (w.abs().amax((1, 2, 3), keepdim=True) / 127).float()
        return torch.clamp(torch.round(w / s), -127, 127) * s

    with torch.no_grad():
        h = model.act(model.a(nn.functional.pad(x, (1, 1, 1, 1))))  # calibration observes the float model
        sx, sh = x.abs().max() / 127, h.abs().max() / 127
        xin = fq(nn.functional.pad(x, (1, 1, 1, 1)), sx)
        h = model.act(nn.functional.conv2d(xin, wq(model.a.weight), model.a.bias))
        ref = nn.functional.conv2d(fq(nn.functional.pad(h, (0, 1, 0, 1)), sh), wq(model.b.weight), model.b.bias, groups=8).mean((2, 3))
    out = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {qdq.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=2e-5)

"""Empirical bias correction (Nagel et al. 2019): the corrected biases are recomputed here, layer by layer, from
the float and the fake-quantized outputs of a hand-written forward, and the int8 graph is read back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from deploycompress.quantization import PTQQuantizer

CONFIG = [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}]


class Net(nn.Module):
    """conv (no bias) -> BN -> ReLU -> depthwise 3x3 conv (bias) -> ReLU -> global pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.relu(self.dw(y))
        return self.fc(y.mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.uniform_(-0.5, 0.5)
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.dw.weight.mul_(3.0)  # coarse weights: a visible rounding shift
    return net


def _fq(t: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """ONNX QuantizeLinear then DequantizeLinear (round half to even), written out here."""
    s = torch.tensor(np.asarray(scale, dtype=np.float32))
    z = torch.tensor(np.asarray(zero_point, dtype=np.float32))
    if axis is not None:
        shape = [1] * t.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    else:
        s, z = s.reshape(()), z.reshape(())
    return (torch.clamp(torch.round(t / s) + z, qmin, qmax) - z) * s


def _q(t: torch.Tensor, p, axis=None) -> torch.Tensor:
    return _fq(t, p.scale, p.zero_point, p.qmin, p.qmax, axis)


def _channel_mean(y: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.movedim(y.double(), axis, -1).reshape(-1, y.shape[axis]).mean(0)


def expected_biases(net: Net, calib, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sequential correction by hand: each layer's quantized input comes from the already corrected layers."""
    W = {n: _q(getattr(net, n).weight.detach(), calib.get(n, "weight"), 0) for n in ("conv", "dw", "fc")}
    I = {n: calib.get(n, "input") for n in ("conv", "dw", "fc")}
    bn = net.bn
    with torch.no_grad():
        # float
        h1 = F.conv2d(x, net.conv.weight, None, padding=1)
        h2 = F.conv2d(F.relu(bn(h1)), net.dw.weight, net.dw.bias, padding=1, groups=8)
        h3 = F.linear(F.relu(h2).mean((2, 3)), net.fc.weight, net.fc.bias)
        # quantized, corrected layer after layer
        q1 = F.conv2d(_q(x, I["conv"]), W["conv"], None, padding=1)
        b1 = -(_channel_mean(q1, 1) - _channel_mean(h1, 1))
        q1 = q1 + b1.float().view(1, -1, 1, 1)
        q2 = F.conv2d(_q(F.relu(bn(q1)), I["dw"]), W["dw"], net.dw.bias, padding=1, groups=8)
        b2 = net.dw.bias.double() - (_channel_mean(q2, 1) - _channel_mean(h2, 1))
        q2 = q2 - net.dw.bias.view(1, -1, 1, 1) + b2.float().view(1, -1, 1, 1)
        q3 = F.linear(_q(F.relu(q2).mean((2, 3)), I["fc"]), W["fc"], net.fc.bias)
        b3 = net.fc.bias.double() - (_channel_mean(q3, 1) - _channel_mean(h3, 1))
    return {"conv": b1, "dw": b2, "fc": b3}


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) + 0.3 for _ in range(3)]


def test_corrected_biases_match_the_hand_computed_sequential_correction():
    net = _net()
    batches = _data()
    model = _net()  # the quantizer wraps (and corrects) its own copy
    q = PTQQuantizer(model, CONFIG)
    q.calibrate(batches, progress=False)
    calib = q.export_calib_config()
    result = q.correct_bias(batches, progress=False)
    got = result.biases(q)
    want = expected_biases(net, calib, torch.cat(batches))
    assert set(got) == {"conv", "dw", "fc"} and not result.skipped
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=2e-5, msg=name)
    # a real correction, not a no-op: the depthwise layer's channels were shifted
    assert float((want["dw"] - net.dw.bias.detach().double()).abs().max()) > 1e-3
    # the caller's float weights are untouched; a bias was added to the bias-free conv
    torch.testing.assert_close(q.wrappers["conv"].module.weight, net.conv.weight, rtol=0, atol=0)
    assert q.wrappers["conv"].module.bias is not None


def test_correction_needs_calibration_first():
    from deploycompress.quantization import QuantizerError

    q = PTQQuantizer(_net(), CONFIG)
    with pytest.raises(QuantizerError, match="calibrate"):
        q.correct_bias(_data(), progress=False)


def test_shared_layer_is_skipped_and_named():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(self.fc(x)))

    torch.manual_seed(0)
    q = PTQQuantizer(Twice().eval(), CONFIG)
    data = [torch.randn(8, 4) for _ in range(2)]
    q.calibrate(data, progress=False)
    result = q.correct_bias(data, progress=False)
    assert "fc" in result.skipped and "shared" in result.skipped["fc"]
    assert set(result.shifts) == {"out"}


def _folded_bias(net: Net, conv_bias: torch.Tensor) -> np.ndarray:
    bn = net.bn
    std = torch.sqrt(bn.running_var + bn.eps)
    return ((conv_bias.double() - bn.running_mean.double()) * (bn.weight / std).double() + bn.bias.double()).detach().numpy()


def _graph_biases(path) -> dict[str, np.ndarray]:
    """Conv/Gemm biases of a graph, dequantized where an int32 bias sits behind a DequantizeLinear."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    produced = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2:
            b = n.input[2]
            if b in inits:
                out[n.name] = inits[b].astype(np.float64)
            elif b in produced and produced[b].op_type == "DequantizeLinear":
                dq = produced[b]
                q, s = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
                out[n.name] = q * s
    return out


@pytest.mark.filterwarnings("ignore::deploycompress.engine.QDQLintWarning")
@pytest.mark.filterwarnings("ignore::deploycompress.precision_audit.PrecisionShortfallWarning")
def test_build_engine_int8_graph_carries_corrected_biases_fp32_graph_the_models(tmp_path):
    from deploycompress import build_engine

    net = _net()
    batches = _data()
    art = build_engine(net, example_inputs=batches[0][:1], out_dir=tmp_path / "b", calib_data=batches, quant_config_list=CONFIG,
                       bias_correction=True, iterations=1, warmup=0, compare_fp32=False, progress=False)
    calib = art.calib_config
    want = expected_biases(net, calib, torch.cat(batches))
    q_biases = sorted(_graph_biases(art.out_dir / "source" / "model.qdq.onnx").values(), key=len)
    f_biases = sorted(_graph_biases(art.out_dir / "source" / "model.fp32.onnx").values(), key=len)
    wanted = sorted([np.asarray(want["fc"]), _folded_bias(net, want["conv"]), np.asarray(want["dw"])], key=len)
    assert len(q_biases) == 3
    for got, exp in zip(q_biases, wanted):
        np.testing.assert_allclose(got, exp, atol=2e-4)  # int32 bias step: input scale x weight scale
    original = sorted([net.fc.bias.detach().double().numpy(), _folded_bias(net, torch.zeros(8)), net.dw.bias.detach().double().numpy()], key=len)
    for got, exp in zip(f_biases, original):
        np.testing.assert_allclose(got, exp, atol=1e-5)
    assert any("bias correction" in n for n in art.report.notes)
    # the caller's model keeps its bias-free conv
    assert net.conv.bias is None


def test_bias_correction_without_calibration_data_is_refused_before_work(tmp_path):
    from deploycompress import build_engine
    from deploycompress.engine import EngineError

    net = _net()
    with pytest.raises(EngineError, match="bias_correction"):
        build_engine(net, example_inputs=torch.randn(1, 3, 8, 8), out_dir=tmp_path / "b", precision="fp32", bias_correction=True, progress=False)
    assert not (tmp_path / "b").exists()


def test_bias_correction_on_the_tensorrt_backend_is_refused_before_work(tmp_path):
    from deploycompress import build_engine
    from deploycompress.engine import EngineError

    net, x = _net(), torch.randn(4, 3, 8, 8)
    with pytest.raises(EngineError, match="onnxruntime target's placement only"):
        build_engine(net, example_inputs=x[:1], out_dir=tmp_path / "b", backend="tensorrt", calib_data=[x],
                     bias_correction=True, progress=False)
    assert not (tmp_path / "b").exists()

"""Quantizers on the digits CNN and small models: fake-quant semantics, calibration export, accuracy."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from calibrators import dequantize, params_from_range, params_from_scale, quantize
from deploycompress.config import ConfigError
from deploycompress.quantization import (
    BNNQuantizer,
    CalibConfig,
    DoReFaQuantizer,
    LSQQuantizer,
    NaiveQuantizer,
    PTQQuantizer,
    QATQuantizer,
    QuantizerError,
    QuantWrapper,
    fake_quantize,
    fake_quantize_ste,
    fold_batchnorm,
)
from deploycompress.zoo import DigitsNet, accuracy, train

CONFIG = [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight", "input", "output"], "quant_bits": 8}]


@pytest.fixture(scope="module")
def data(digits_data):
    return digits_data


@pytest.fixture(scope="module")
def trained(_trained_digits):
    return _trained_digits


class Zoo(nn.Module):
    """One of every supported weighted layer, so axes and lengths can be checked."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c3 = nn.Conv3d(2, 4, 1)
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.up = nn.ConvTranspose2d(5, 6, 2, stride=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 7)

    def forward(self, x):  # x: (N, 2, 4, 4)
        a = self.c1(x.flatten(2)).mean()
        b = self.c3(x.unsqueeze(2)).mean()
        y = self.act(self.up(self.conv(x)))
        return self.fc(y.mean((2, 3))) + a + b


# -- fake-quant semantics ----------------------------------------------------------------------------


def _onnx_qdq(x: np.ndarray, p) -> np.ndarray:
    qtype = TensorProto.INT8 if p.signed else TensorProto.UINT8
    zp_np = np.asarray(p.zero_point, dtype=np.int8 if p.signed else np.uint8)
    scale, zp = np.asarray(p.scale, np.float32), zp_np
    if p.axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    attrs = {} if p.axis is None else {"axis": p.axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert qtype in (TensorProto.INT8, TensorProto.UINT8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "params",
    [
        params_from_range(-1.3, 2.1),  # int8 symmetric per-tensor
        params_from_range(-0.7, 3.3, signed=False, symmetric=False),  # uint8 affine
        params_from_range(np.array([-1.0, -0.1, -5.0]), np.array([0.2, 0.3, 4.0]), axis=1),  # per-channel
    ],
)
def test_fake_quantize_equals_onnxruntime_qdq_bit_for_bit(params):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 5)) * 2).astype(np.float32)
    s = np.asarray(params.scale, np.float32)
    ties = (np.arange(-2, 3) + 0.5).astype(np.float32)  # exact halves: round half to even
    for c in range(3):
        x[0, c, 0, :5] = ties * (s[c] if params.axis is not None else s[0])
    ours = fake_quantize(torch.from_numpy(x), params).numpy()
    np.testing.assert_array_equal(ours, _onnx_qdq(x, params))
    np.testing.assert_array_equal(ours, dequantize(quantize(x, params), params))


def test_fake_quantize_by_hand():
    p = params_from_scale(0.25, 0, bits=4, signed=True)  # q in [-8, 7]
    x = torch.tensor([0.125, 0.375, -0.125, 1.6, 5.0, -5.0, 0.1])
    # 0.125/0.25 = 0.5 -> 0 (even), 0.375/0.25 = 1.5 -> 2, 1.6 -> 6.4 -> 6, saturation at 7 and -8
    expected = torch.tensor([0.0, 0.5, -0.0, 1.5, 1.75, -2.0, 0.0])
    assert torch.equal(fake_quantize(x, p), expected)


def test_ste_passes_gradient_inside_the_range_only():
    p = params_from_scale(0.1, 0, bits=8, signed=True)  # representable [-12.8, 12.7]
    x = torch.tensor([-20.0, -12.8, 0.33, 12.7, 13.0], requires_grad=True)
    fake_quantize_ste(x, p).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# -- PTQ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_ptq_each_calibrator_loses_at_most_1_5_points(data, trained, calibrator):
    model, fp32 = trained
    model = copy.deepcopy(model)
    options = {"stride": 4} if calibrator == "entropy" else {}  # every 4th candidate: 4x faster, same accuracy
    q = PTQQuantizer(model, CONFIG, calibrator=calibrator, **options)
    q.calibrate(data.batches(128, split="train"), num_batches=6)
    acc = accuracy(model, data.test_x, data.test_y)
    assert fp32 > 0.9 and acc >= fp32 - 0.015, (calibrator, fp32, acc)
    # simulation really runs: outputs differ from float, but only slightly
    calib = q.export_calib_config()
    assert set(calib.modules) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert calib.get("conv2", "weight").axis == 0 and calib.get("conv2", "weight").scale.size == 32
    assert calib.get("conv2", "input").axis is None and calib.get("conv2", "input").symmetric


def test_ptq_export_reproduces_the_simulation(tmp_path, data, trained):
    model, _ = trained
    model = copy.deepcopy(model)
    q = PTQQuantizer(model, CONFIG, calibrator="percentile", percentile=99.99)
    q.calibrate([data.train_x[:200]])
    with torch.no_grad():
        simulated = model(data.test_x)
    q.export_model(tmp_path / "model.pt", tmp_path / "calib.json")
    plain = DigitsNet(width=16).eval()
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    calib = CalibConfig.load(tmp_path / "calib.json")
    calib.validate(plain)
    # QDQ from the file around each plain module = the wrapped simulation, to the bit
    for name, kind, params in calib.items():
        module = plain.get_submodule(name)
        if kind == "input":
            module.register_forward_pre_hook(lambda m, a, p=params: (fake_quantize(a[0], p),))
        elif kind == "output":
            module.register_forward_hook(lambda m, a, out, p=params: fake_quantize(out, p))
        else:
            assert torch.equal(fake_quantize(module.weight, params), module.weight)  # stored on the grid
    with torch.no_grad():
        assert torch.equal(plain(data.test_x), simulated)
    restored = q.unwrap_model()
    assert not any(isinstance(m, QuantWrapper) for m in restored.modules())


def test_ptq_axes_on_every_layer_type():
    torch.manual_seed(0)
    model = Zoo().eval()
    cfg = [
        {"op_types": ["default"], "quant_types": ["weight", "input"]},
        {"op_names": ["act"], "quant_types": ["output"], "quant_dtype": "uint", "quant_scheme": "affine"},
        {"op_names": ["fc"], "quant_types": ["weight"], "granularity": "per_tensor", "quant_bits": 4},
    ]
    q = PTQQuantizer(model, cfg)
    q.calibrate((torch.randn(2, 2, 4, 4) for _ in range(3)))
    calib = q.export_calib_config()
    shapes = {name: (p.axis, p.scale.size) for name, kind, p in calib.items() if kind == "weight"}
    assert shapes == {"c1": (0, 3), "c3": (0, 4), "conv": (0, 5), "up": (1, 6), "fc": (None, 1)}
    assert calib.get("fc", "weight").bits == 4 and calib.get("fc", "input") is None
    act = calib.get("act", "output")
    assert act.dtype == "uint" and not act.symmetric and act.zero_point[0] == 0
    calib.validate(q.unwrap_model())


def test_bad_input_is_named(data, trained):
    model = copy.deepcopy(trained[0])
    with pytest.raises(ConfigError, match="unknown quant_type 'bias'"):
        PTQQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["bias"]}])
    with pytest.raises(ConfigError, match=r"module 'conv1': quant_bits\['weight'\] = 1 is below the 2-bit minimum"):
        PTQQuantizer(model, [{"op_names": ["conv1"], "quant_types": ["weight"], "quant_bits": 1}])
    with pytest.raises(ConfigError, match="quant_bits' must be an integer from 1 to 16, got 17"):
        PTQQuantizer(model, [{"op_names": ["conv1"], "quant_types": ["weight"], "quant_bits": 17}])
    with pytest.raises(ConfigError, match="on module 'relu': quant_type 'weight' given, but ReLU has no weight"):
        PTQQuantizer(model, [{"op_names": ["relu"], "quant_types": ["weight"]}])
    with pytest.raises(QuantizerError, match="unknown calibrator 'kl'"):
        PTQQuantizer(model, CONFIG, calibrator="kl")
    assert not any(isinstance(m, QuantWrapper) for m in model.modules())  # a failed start leaves no wrappers
    q = PTQQuantizer(model, CONFIG)
    with pytest.raises(QuantizerError, match="conv1.input has no calibration yet: run calibrate"):
        q.export_calib_config()
    bad = data.test_x[:8].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(QuantizerError, match="conv1.input: batch 0 holds 1 NaN/inf"):
        q.calibrate([bad])
    with pytest.raises(QuantizerError, match="got no batches"):
        q.calibrate([])


def test_naive_quantizes_weights_only(trained, data):
    model = copy.deepcopy(trained[0])
    q = NaiveQuantizer(model, [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight"]}])
    calib = q.export_calib_config()
    w = calib.get("conv2", "weight")
    assert w.axis is None and w.bits == 8 and len(calib) == 5
    amax = float(model.conv2.module.weight.detach().abs().max())
    assert w.scale[0] == np.float32(amax / 127)
    assert accuracy(model, data.test_x, data.test_y) >= trained[1] - 0.015


# -- training-aware -----------------------------------------------------------------------------------


def test_qat_recovers_fp32_accuracy_at_8_bits(data, trained):
    model, fp32 = trained
    model = copy.deepcopy(model)
    q = QATQuantizer(model, CONFIG)
    train(model, data, epochs=1, lr=1e-4, after_step=q.step)
    assert q.steps == (len(data.train_x) + 63) // 64
    acc = accuracy(model, data.test_x, data.test_y)
    assert acc >= fp32 - 0.01, (fp32, acc)
    calib = q.export_calib_config()
    assert calib.get("conv1", "output").min[0] < 0 < calib.get("conv1", "output").max[0]
    # eval-mode simulation uses exactly the exported parameters
    p = calib.get("fc2", "weight")
    assert torch.equal(q.quantize_weight(model.fc2.module.weight, q.wrappers["fc2"]), fake_quantize(model.fc2.module.weight, p))


def test_fold_batchnorm_keeps_outputs_and_names(trained, data):
    model = copy.deepcopy(trained[0]).eval()
    with torch.no_grad():
        before = model(data.test_x)
    pairs = fold_batchnorm(model)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(data.test_x), before, atol=1e-4, rtol=1e-4)
    q = QATQuantizer(copy.deepcopy(trained[0]), CONFIG, fold_bn=True)
    assert q.folded == pairs


def test_lsq_learns_step_sizes_and_exports_them_exactly(data, trained):
    model = copy.deepcopy(trained[0])
    q = LSQQuantizer(model, [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight", "input"], "quant_bits": 4}])
    before = float(model.conv2.weight_scale.detach())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    idx = torch.arange(256)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    model.eval()
    assert float(model.conv2.weight_scale.detach()) != before
    calib = q.export_calib_config()
    assert calib.get("conv2", "weight").scale[0] == np.float32(abs(float(model.conv2.weight_scale.detach())))
    w = model.conv2.module.weight
    assert torch.equal(q.quantize_weight(w, q.wrappers["conv2"]).detach(), fake_quantize(w, calib.get("conv2", "weight")))
    x = data.test_x[:16]
    assert torch.equal(q.quantize_input(x, q.wrappers["conv1"]).detach(), fake_quantize(x, calib.get("conv1", "input")))


def test_dorefa_weights_and_their_export(trained):
    model = copy.deepcopy(trained[0])
    q = DoReFaQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["weight"], "quant_bits": 3}])
    w = q.deploy_weight(q.wrappers["conv2"])
    values = torch.unique(w)
    assert len(values) <= 8 and values.abs().max() <= 1.0
    p = q.export_calib_config().get("conv2", "weight")
    assert p.bits == 4 and p.scale[0] == np.float32(1 / 7) and p.zero_point[0] == 0
    assert torch.equal(fake_quantize(w, p), w)  # the 3-bit grid is exactly a 4-bit QDQ grid
    plain = q.unwrap_model(bake=True)
    assert torch.equal(plain.conv2.weight, w)


def test_bnn_binary_weights_export_and_activation_error(trained):
    model = copy.deepcopy(trained[0])
    q = BNNQuantizer(model, [{"op_types": ["Conv2d"], "quant_types": ["weight"]}, {"op_names": ["fc1"], "quant_types": ["weight", "output"]}])
    w = q.deploy_weight(q.wrappers["conv1"])
    assert set(torch.unique(w).tolist()) <= {-1.0, 1.0}
    with pytest.raises(QuantizerError, match=r"fc1.output: BNN binarizes it with sign\(\).*not representable in ONNX QDQ"):
        q.export_calib_config()
    q.unwrap_model()
    ok = BNNQuantizer(copy.deepcopy(trained[0]), [{"op_types": ["Conv2d", "Linear"], "quant_types": ["weight"]}])
    p = ok.export_calib_config().get("fc2", "weight")
    assert (p.bits, p.scale[0], p.zero_point[0]) == (2, 1.0, 0)


def test_fp32_baseline_is_a_real_model(trained):
    assert trained[1] > 0.93  # the accuracy checks above compare against a trained net, not chance


def test_dorefa_activations_are_an_unsigned_qdq():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    q = DoReFaQuantizer(model, [{"op_types": ["ReLU"], "quant_types": ["output"], "quant_bits": 2}])
    x = torch.tensor([[-1.0, 0.2, 0.5, 3.0]])
    p = q.export_calib_config().get("1", "output")
    assert (p.dtype, p.bits, p.scale[0], p.zero_point[0]) == ("uint", 2, np.float32(1 / 3), 0)
    out = q.quantize_output(x, q.wrappers["1"])
    assert torch.equal(out, torch.tensor([[0.0, np.float32(1 / 3), np.float32(2 / 3), 1.0]]))


def test_qat_activation_range_is_an_ema_of_batch_ranges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    q = QATQuantizer(model, [{"op_types": ["Linear"], "quant_types": ["input"]}], ema_decay=0.9)
    model.train()
    model(torch.tensor([[0.0, 1.0, 2.0]]))
    model(torch.tensor([[-4.0, 0.0, 12.0]]))
    p = q.export_calib_config().get("0", "input")
    assert p.min[0] == pytest.approx(0.0 + 0.1 * (-4.0 - 0.0)) and p.max[0] == pytest.approx(2.0 + 0.1 * 10.0)
    model.eval()
    model(torch.tensor([[100.0, 0.0, 0.0]]))  # eval mode leaves the range alone
    assert q.export_calib_config().get("0", "input").max[0] == p.max[0]

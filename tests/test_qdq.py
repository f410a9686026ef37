"""insert_qdq per target and lint_qdq: the calibration reaches the graph intact and by the rules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from calibrators import params_from_range
from deploycompress.export import QDQError, insert_qdq, lint_qdq, to_onnx
from deploycompress.quantization import CalibConfig
from test_export import Branchy, _randomise_bn

WEIGHT_AXIS = {nn.ConvTranspose2d: 1, nn.Conv2d: 0, nn.Linear: 0}


def calibrate_by_hand(model: nn.Module, batches, kinds: dict[type, tuple[str, ...]]) -> CalibConfig:
    """Observed min/max -> params_from_range: per-channel weights, per-tensor activations."""
    seen: dict[tuple[str, str], tuple[float, float]] = {}
    handles = []
    calib = CalibConfig()
    for name, mod in model.named_modules():
        wanted = next((k for t, k in kinds.items() if type(mod) is t), ())
        if "weight" in wanted:
            axis = next(a for t, a in WEIGHT_AXIS.items() if isinstance(mod, t))
            w = mod.weight.detach().transpose(0, axis).reshape(mod.weight.shape[axis], -1)
            calib.set(name, "weight", params_from_range(w.min(1).values.numpy(), w.max(1).values.numpy(), axis=axis))

        def hook(mod, inp, out, name=name, wanted=wanted):
            for kind in ("input", "output"):
                if kind in wanted:
                    t = inp[0] if kind == "input" else out
                    lo, hi = float(t.min()), float(t.max())
                    old = seen.get((name, kind), (lo, hi))
                    seen[(name, kind)] = (min(lo, old[0]), max(hi, old[1]))

        if wanted:
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    for (name, kind), (lo, hi) in seen.items():
        calib.set(name, kind, params_from_range(lo, hi))
    return calib


def write_digits_graphs(tmp, samples: int, kinds: dict[type, tuple[str, ...]]):
    """An untrained DigitsNet exported to ``tmp/fp32.onnx`` and, calibrated by hand, ``tmp/int8.onnx``."""
    from deploycompress.zoo import DigitsNet

    torch.manual_seed(0)
    model = DigitsNet(width=8).eval()
    x = torch.rand(samples, 1, 8, 8)
    exported = to_onnx(model, x[:2])
    calib = calibrate_by_hand(model, [x], kinds)
    onnx.save(exported.model, tmp / "fp32.onnx")
    onnx.save(insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime"), tmp / "int8.onnx")
    return model, x


FULL = {nn.Conv2d: ("input", "weight"), nn.ConvTranspose2d: ("input", "weight"), nn.Linear: ("input", "weight"),
        nn.BatchNorm2d: ("output",), nn.ReLU: ("output",)}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = _randomise_bn(Branchy())
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    exported = to_onnx(model, batches[0][:2])
    return model, batches, exported, calibrate_by_hand(model, batches, FULL)


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _inits(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _dq_of(proto, consumer_op):
    """(DequantizeLinear node, consumer) for the weight input of every ``consumer_op``."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    return [(producers[n.input[1]], n) for n in proto.graph.node if n.op_type == consumer_op]


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_qdq_graph_runs_close_to_float_and_lints_clean(setup, target):
    model, batches, exported, calib = setup
    qdq = insert_qdq(exported.model, calib, exported.name_map, target=target)
    assert [f for f in lint_qdq(qdq, target) if f.severity == "error"] == []
    x = torch.randn(8, 3, 8, 8)
    ref = model(x).detach().numpy()
    out = _run(qdq, x.numpy())
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err  # quantized (not identical), yet close
    assert qdq.opset_import[0].version >= 13


def test_tensorrt_flavour_is_s8_symmetric_with_per_channel_weights(setup):
    _, _, exported, calib = setup
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="tensorrt")
    inits = _inits(qdq)
    for n in qdq.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name
    (gemm,) = [n for n in qdq.graph.node if n.op_type == "Gemm"]  # the classifier head: a GEMV, float for TensorRT
    assert gemm.input[1] in inits and inits[gemm.input[1]].dtype == np.float32
    for op, axis in (("Conv", 0), ("ConvTranspose", 1)):
        for dq, node in _dq_of(qdq, op):
            attrs = {a.name: a.i for a in dq.attribute}
            assert dq.op_type == "DequantizeLinear" and attrs["axis"] == axis, node.name
            w = inits[dq.input[0]]
            assert w.dtype == np.int8 and inits[dq.input[1]].size == w.shape[axis]
    # outputs of weighted ops stay float; the residual Add reads its skip branch (relu1's output,
    # quantized as conv2's input) dequantized, and conv2's folded output in float
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    assert [producers.get(i) for i in add.input] == ["Conv", "DequantizeLinear"]


def test_onnxruntime_flavour_is_u8_activations_and_int32_bias(setup):
    _, _, exported, calib = setup
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime", reduce_range=False)
    inits = _inits(qdq)
    act_zp = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zp and all(z.dtype == np.uint8 for z in act_zp)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    conv3 = next(n for n in qdq.graph.node if n.name == "/conv3/Conv")
    bias_dq = producers[conv3.input[2]]
    assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32
    # the ReLU after conv1 feeds a uint8 Q: its input is left unquantized so onnxruntime fuses Conv+Relu+Q
    assert "/conv1/Conv_output_0_QuantizeLinear" not in {n.name for n in qdq.graph.node}


def test_folded_weights_quantize_to_the_simulated_integers(setup):
    """BatchNorm folding rescales a channel and its scale alike: the int8 weights equal the simulation's."""
    model, _, exported, calib = setup
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="tensorrt")
    dq = next(dq for dq, node in _dq_of(qdq, "Conv") if node.name == "/conv1/Conv")
    graph_q = _inits(qdq)[dq.input[0]].astype(np.int64)
    p = calib.get("conv1", "weight")
    sim_q = np.clip(np.round(model.conv1.weight.detach().numpy() / p.scale.reshape(-1, 1, 1, 1)), -128, 127)
    sign = np.sign(exported.name_map["conv1"].weight_fold).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(graph_q, sim_q * sign)


def test_concat_inputs_share_one_scale(setup):
    _, _, exported, calib = setup
    for target in ("onnxruntime", "tensorrt"):
        qdq = insert_qdq(exported.model, calib, exported.name_map, target=target)
        inits = _inits(qdq)
        producers = {o: n for n in qdq.graph.node for o in n.output}
        concat = next(n for n in qdq.graph.node if n.op_type == "Concat")
        dqs = [producers[i] for i in concat.input]
        assert all(d.op_type == "DequantizeLinear" for d in dqs)
        assert len({float(inits[d.input[1]]) for d in dqs}) == 1


def test_reduce_range_keeps_weights_in_seven_bits(setup):
    _, _, exported, calib = setup
    full = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime", reduce_range=False)
    reduced = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime", reduce_range=True)
    wmax = lambda proto: max(int(np.abs(a).max()) for a in _inits(proto).values() if a.dtype == np.int8 and a.ndim >= 2)
    assert wmax(full) == 127 and wmax(reduced) <= 64
    with pytest.raises(QDQError, match="reduce_range"):
        insert_qdq(exported.model, calib, exported.name_map, target="tensorrt", reduce_range=True)


def test_calibration_naming_missing_modules_lists_them_all(setup):
    _, _, exported, calib = setup
    bad = CalibConfig(modules=dict(calib.modules))
    bad.set("conv9", "input", params_from_range(-1.0, 1.0))
    bad.set("layer4.fc", "weight", params_from_range(np.array([-1.0]), np.array([1.0]), axis=0))
    with pytest.raises(QDQError) as info:
        insert_qdq(exported.model, bad, exported.name_map)
    assert "conv9" in str(info.value) and "layer4.fc" in str(info.value)


def test_weight_calibration_of_another_width_is_refused(setup):
    _, _, exported, _ = setup
    calib = CalibConfig()
    calib.set("conv1", "weight", params_from_range(-np.ones(5), np.ones(5), axis=0))
    with pytest.raises(QDQError, match="5 scales.*8 output channels"):
        insert_qdq(exported.model, calib, exported.name_map)


def test_bad_target_and_empty_calibration(setup):
    _, _, exported, calib = setup
    with pytest.raises(QDQError, match="target"):
        insert_qdq(exported.model, calib, exported.name_map, target="openvino")
    with pytest.raises(QDQError, match="empty"):
        insert_qdq(exported.model, CalibConfig(), exported.name_map)


def test_lint_reports_each_broken_rule(setup):
    _, _, exported, calib = setup
    # weights only: every weighted op's input is float, and TensorRT could not fuse the residual Add
    weights_only = CalibConfig()
    for module, kind, p in calib.items():
        if kind == "weight":
            weights_only.set(module, kind, p)
    qdq = insert_qdq(exported.model, weights_only, exported.name_map, target="tensorrt")
    rules = {(f.node, f.rule) for f in lint_qdq(qdq, "tensorrt")}
    assert ("/conv2/Conv", "input-unquantized") in rules and ("/Add", "residual-add") in rules
    # a uint8 graph is no TensorRT graph; a negative scale is invalid everywhere
    u8 = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    assert any(f.rule == "tensorrt-symmetric" for f in lint_qdq(u8, "tensorrt"))
    broken = onnx.ModelProto()
    broken.CopyFrom(u8)
    scale = next(i for i in broken.graph.initializer if i.name == "x_scale")
    scale.CopyFrom(numpy_helper.from_array(np.array(-0.1, np.float32), "x_scale"))
    assert ("x_QuantizeLinear", "scale-positive") in {(f.node, f.rule) for f in lint_qdq(broken, "onnxruntime")}


def test_tensorrt_quantizes_a_weighted_output_that_feeds_another_weighted_op():
    """conv -> BatchNorm -> conv (mobilenet_v2's projection into the next block): the second conv's input
    is quantized although a weighted op produced it, and the lint accepts it."""
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)))
    x = torch.randn(4, 3, 6, 6)
    exported = to_onnx(model, x)
    calib = calibrate_by_hand(model, [x], FULL)
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="tensorrt")
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    second = [n for n in qdq.graph.node if n.op_type == "Conv"][1]
    assert producers[second.input[0]] == "DequantizeLinear"
    assert lint_qdq(qdq, "tensorrt") == []


def _ort_int8_ops(proto) -> list[str]:
    """Op types of the graph onnxruntime actually runs (its own optimizer, all levels)."""
    import tempfile, os

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


class _FPad(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        pad = lambda t: torch.nn.functional.pad(t, (1, 1, 1, 1), mode=self.mode)  # noqa: E731
        return self.c2(pad(torch.relu(self.c1(pad(x)))))


@pytest.mark.parametrize("make", [
    *[lambda m=m: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=m), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, padding_mode=m))
      for m in ("zeros", "reflect", "replicate", "circular")],
    *[lambda m=m: _FPad(m) for m in ("constant", "reflect", "replicate", "circular")],
], ids=["zeros", "reflect", "replicate", "circular", "F.pad-constant", "F.pad-reflect", "F.pad-replicate", "F.pad-circular"])
def test_padded_convs_run_in_int8_and_lint_clean(make):
    """Q/DQ move past Pad/Slice/Concat to the conv's own input: both convs become QLinearConv."""
    torch.manual_seed(0)
    model = make().eval()
    batches = [torch.randn(8, 3, 8, 8)]
    exported = to_onnx(model, batches[0][:2])
    # outputs calibrated too: the last conv's output is the graph output, which must be quantized for
    # onnxruntime to fuse it (and c1's output, behind a Relu, is folded away by the Relu rule)
    calib = calibrate_by_hand(model, batches, {nn.Conv2d: ("input", "weight", "output"), nn.ReLU: ("output",)})
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    assert lint_qdq(qdq, "onnxruntime") == []
    ops = _ort_int8_ops(qdq)
    assert ops.count("QLinearConv") + ops.count("ConvInteger") == 2, ops
    x = batches[0][:4]  # within the calibrated range
    ref = model(x).detach().numpy()
    err = np.abs(_run(qdq, x.numpy()) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err


def test_one_target_description_drives_insert_and_lint(setup):
    """A target registered once is what insert_qdq places by and lint_qdq checks by."""
    from dataclasses import replace

    from deploycompress.export.targets import QDQ_TARGETS, get_target, register_target

    _, _, exported, calib = setup
    custom = replace(get_target("onnxruntime"), name="s8-ort", activation_dtype="int8", activation_symmetric=True)
    register_target(custom)
    try:
        qdq = insert_qdq(exported.model, calib, exported.name_map, target="s8-ort", reduce_range=False)
        zps = [numpy_helper.to_array(i) for i in qdq.graph.initializer if i.name.endswith("_zero_point")]
        assert zps and all(z.dtype in (np.int8, np.int32) and not z.any() for z in zps)
        assert [f for f in lint_qdq(qdq, "s8-ort") if f.severity == "error"] == []
        # the onnxruntime description (uint8) flags the same graph's activations
        assert any(f.rule == "activation-dtype" for f in lint_qdq(qdq, "onnxruntime"))
    finally:
        QDQ_TARGETS.pop("s8-ort")
    with pytest.raises(QDQError, match="onnxruntime"):
        insert_qdq(exported.model, calib, exported.name_map, target="s8-ort")
    with pytest.raises(ValueError, match="tensorrt"):
        lint_qdq(qdq, "nope")


def _ort_float_pads(proto) -> int:
    """Pads in onnxruntime's optimized graph whose data input is not an integer tensor (a Q or QLinear op's output)."""
    import tempfile, os

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "Pad"
               and not (producers.get(n.input[0], "").startswith("QLinear") or producers.get(n.input[0]) == "QuantizeLinear"))


class _SamePadConv(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: a Conv2d subclass padding with its own Pad module."""

    def __init__(self, cin, cout, k, stride=1, value=0.0):
        super().__init__(cin, cout, k, stride=stride, padding=0)
        self.static_padding = nn.ConstantPad2d(k // 2, value)

    def forward(self, x):
        return super().forward(self.static_padding(x))


class _SamePadConvOut(_SamePadConv):
    """The same layer, calibrated with its output too (the layer before the residual Add, the last one)."""


class _PaddedResidual(nn.Module):
    """stem -> (conv, relu, conv) + skip -> conv with a non-zero constant pad."""

    def __init__(self, stem_relu: bool):
        super().__init__()
        self.stem, self.act0 = _SamePadConv(3, 8, 3, stride=2), nn.ReLU() if stem_relu else nn.Identity()
        self.c1, self.act1 = _SamePadConv(8, 8, 3), nn.ReLU()
        self.c2 = _SamePadConvOut(8, 8, 3)
        self.head = _SamePadConvOut(8, 4, 3, value=0.5)

    def forward(self, x):
        s = self.act0(self.stem(x))
        return self.head(s + self.c2(self.act1(self.c1(s))))


@pytest.mark.parametrize("stem_relu", [True, False], ids=["skip-calibrated-as-relu-output", "skip-calibrated-as-conv-input-only"])
def test_constant_pads_run_in_int8_and_residual_add_fuses(stem_relu):
    """onnxruntime's optimized graph: every conv is QLinearConv, the residual Add is QLinearAdd, no Pad
    runs in float. Expected counts from the model: 4 padded convs, 1 residual Add; the 3 zero pads fold
    into their convs, the 0.5 pad stays as one integer Pad (its constant quantized)."""
    torch.manual_seed(0)
    model = _PaddedResidual(stem_relu).eval()
    batches = [torch.randn(8, 3, 16, 16)]
    exported = to_onnx(model, batches[0][:2])
    # without the stem's Relu the skip is calibrated only as c1's input (c1 reads it privately)
    calib = calibrate_by_hand(model, batches, {_SamePadConv: ("input", "weight"), _SamePadConvOut: ("input", "weight", "output"),
                                               nn.ReLU: ("output",)})
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    assert [n.op_type for n in exported.model.graph.node].count("Pad") == 4
    assert lint_qdq(qdq, "onnxruntime") == []
    ops = _ort_int8_ops(qdq)
    float_pads = _ort_float_pads(qdq)
    assert (ops.count("QLinearConv"), ops.count("QLinearAdd"), ops.count("Pad"), float_pads) == (4, 1, 1, 0), ops
    x = batches[0][:4]
    ref = model(x).detach().numpy()
    err = np.abs(_run(qdq, x.numpy()) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err


class _PaddedViewHead(nn.Module):
    """EfficientNet-Lite's tail: ``bs = x.size(0)`` read from the input, 'same' zero pads before strided convs
    (asymmetric, so the exporter computes the Pad's pads), global pool, ``view(bs, -1)``, Linear."""

    def __init__(self):
        super().__init__()
        self.pad1, self.c1, self.act1 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()
        self.pad2, self.c2, self.act2 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)

    def forward(self, x):
        bs = x.size(0)
        y = self.act2(self.c2(self.pad2(self.act1(self.c1(self.pad1(x))))))
        return self.fc(self.pool(y).view(bs, -1))


def test_view_of_the_input_batch_folds_into_one_constant_reshape():
    """onnxruntime's optimized graph runs ``x.view(x.size(0), -1)`` as one Reshape: no Shape/Gather/Unsqueeze/
    Concat left at every inference. ONNX shape inference names the batch dim after a computed Pad ``unk__N``,
    which keeps onnxruntime from proving it equal to the input's; the graph's symbolic shapes let it fold.
    Expected counts from the model: 2 convs, 1 Linear, 1 view."""
    torch.manual_seed(0)
    model = _PaddedViewHead().eval()
    batches = [torch.randn(8, 3, 16, 16)]
    exported = to_onnx(model, batches[0][:2])
    raw = [n.op_type for n in exported.model.graph.node]
    assert raw.count("Shape") == 1 and raw.count("Pad") == 2, raw  # the view reads the input's batch at run time
    calib = calibrate_by_hand(model, batches, {nn.Conv2d: ("input", "weight"), nn.Linear: ("input", "weight"), nn.ReLU: ("output",)})
    qdq = insert_qdq(exported.model, calib, exported.name_map, target="onnxruntime")
    ops = _ort_int8_ops(qdq)
    assert [ops.count(o) for o in ("QLinearConv", "QGemm", "Reshape", "Shape", "Gather", "Unsqueeze", "Concat")] == [2, 1, 1, 0, 0, 0, 0], ops
    stripped = onnx.ModelProto()
    stripped.CopyFrom(qdq)
    del stripped.graph.value_info[:]
    assert "Shape" in _ort_int8_ops(onnx.shape_inference.infer_shapes(stripped))  # what ONNX's own shapes leave
    x = batches[0][:3]  # a batch size other than the exported one: the folded Reshape copies it
    ref = model(x).detach().numpy()
    out = _run(qdq, x.numpy())
    assert out.shape == (3, 5)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err

"""Models built from conv/linear subclasses: selected, pruned, sped up, quantized and built like their bases.

The subclasses are the kinds real libraries ship: EfficientNet-Lite's ``Conv2dStaticSamePadding`` (a pad
module, then the conv), timm's ``Conv2dSame`` (padding computed in forward), timm's ``StdConv2d`` (weight
standardised in forward), and a conv whose forward scales its output (not its base's computation).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploycompress.config import ConfigError, register_op_type, select_modules
from conformance_models import MHANet


# ---------------------------------------------------------------------------------------------- subclasses
class StaticSamePadConv2d(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding: TensorFlow 'SAME' padding, a ZeroPad2d child fixed at build."""

    def __init__(self, cin, cout, k, stride=1, image_size=8, **kw):
        super().__init__(cin, cout, k, stride, **kw)
        pad = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicSameConv2d(nn.Conv2d):
    """timm's Conv2dSame: the 'SAME' padding computed from the input in forward (no child module)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: weight standardisation (per output channel, eps 1e-6) in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv2d(nn.Conv2d):
    """Not its base's computation: the output is multiplied by a learned scale."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return super().forward(x) * self.scale


class MyLinear(nn.Linear):
    """A subclass that only renames its base."""


class SubclassNet(nn.Module):
    """Every kind above in one small CNN (8x8 input, 10 classes)."""

    def __init__(self, *, std: bool = True, scaled: bool = False) -> None:
        super().__init__()
        self.stem = StaticSamePadConv2d(3, 8, 3, stride=2, image_size=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = StaticSamePadConv2d(8, 8, 3, image_size=4, groups=8, bias=False)
        self.pw = DynamicSameConv2d(8, 12, 3)
        self.conv3 = StdConv2d(12, 12, 3, padding=1) if std else nn.Conv2d(12, 12, 3, padding=1)
        self.extra = ScaledConv2d(12, 12, 1) if scaled else nn.Conv2d(12, 12, 1)
        self.fc = MyLinear(12, 10)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.act(self.dw(x))
        x = self.act(self.pw(x))
        x = self.act(self.conv3(x))
        x = self.act(self.extra(x))
        return self.fc(x.mean((2, 3)))


def _net(**kw) -> SubclassNet:
    torch.manual_seed(0)
    net = SubclassNet(**kw).eval()
    with torch.no_grad():  # a BatchNorm with real statistics, so folding it matters
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


WEIGHTED = ["stem", "dw", "pw", "conv3", "extra", "fc"]


# ---------------------------------------------------------------------------------------------- selection
def test_op_types_select_subclasses_by_isinstance():
    net = _net(scaled=True)
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "sparsity": 0.5}])
    assert list(sel) == WEIGHTED
    assert sel["stem"].op_type == "StaticSamePadConv2d"  # the class name is still reported


def test_exact_matching_is_nni_rule_and_must_be_asked_for():
    net = _net(std=False)
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "op_types_match": "exact", "sparsity": 0.5}])
    assert list(sel) == ["conv3", "extra"]  # the two plain Conv2d; MyLinear and the padded convs are other classes
    with pytest.raises(ConfigError, match="op_types_match"):
        select_modules(net, [{"op_types": ["Conv2d"], "op_types_match": "subclass", "sparsity": 0.5}])


def test_model_classes_qualnames_and_registered_types_resolve():
    net = _net()
    assert list(select_modules(net, [{"op_types": ["StaticSamePadConv2d"], "sparsity": 0.5}])) == ["stem", "dw"]
    qual = f"{StdConv2d.__module__}.{StdConv2d.__qualname__}"
    assert list(select_modules(net, [{"op_types": [qual], "sparsity": 0.5}])) == ["conv3"]

    class PaddedBase(nn.Conv2d):  # a base the model's classes do not derive from: selects nothing until registered
        pass

    with pytest.raises(ConfigError, match="matches no module"):
        select_modules(net, [{"op_types": ["PaddedBase"], "sparsity": 0.5}])
    register_op_type(nn.modules.conv._ConvNd, "AnyConv")
    assert list(select_modules(net, [{"op_types": ["AnyConv"], "sparsity": 0.5}])) == WEIGHTED[:-1]


def test_exclude_op_types_excludes_subclasses_too():
    net = _net()
    sel = select_modules(net, [{"op_types": ["Conv2d", "Linear"], "exclude_op_types": ["StaticSamePadConv2d"], "sparsity": 0.5}])
    assert list(sel) == ["pw", "conv3", "extra", "fc"]


def test_defaults_cover_every_weighted_subclass():
    from deploycompress.engine import default_quant_config
    from deploycompress.pruning import L1NormPruner
    from deploycompress.quantization import PTQQuantizer

    net = _net()
    pruner = L1NormPruner(net, [{"op_types": ["default"], "sparsity": 0.5}])
    assert list(pruner.module_configs) == WEIGHTED
    q = PTQQuantizer(_net(), default_quant_config(_net()))
    assert [n for n in q.wrappers if "weight" in q.wrappers[n].quant_types] == WEIGHTED


# ---------------------------------------------------------------------------------------------- forms
X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_each_subclass_is_checked_against_its_base_on_the_example_input():
    from deploycompress.subclasses import analyse_layers

    forms = analyse_layers(_net(scaled=True), X)
    assert {n: f.kind for n, f in forms.items()} == {
        "stem": "padded", "dw": "padded", "pw": "padded", "conv3": "weight_transform", "extra": "epilogue", "fc": "base",
    }  # fmt: skip
    assert forms["stem"].pads == (0, 1, 0, 1) and forms["dw"].pads == (1, 1, 1, 1)


class TwiceConv2d(nn.Conv2d):
    def forward(self, x):
        return super().forward(super().forward(x))


class SquaredInputConv2d(nn.Conv2d):
    def forward(self, x):
        return super().forward(x * x)


@pytest.mark.parametrize("cls, why", [(TwiceConv2d, "calls conv2d 2 times"), (SquaredInputConv2d, "transforms the input")])
def test_a_subclass_no_rule_covers_is_refused_by_name(cls, why, tmp_path):
    from deploycompress import build_engine
    from deploycompress.engine import EngineError
    from deploycompress.quantization import PTQQuantizer
    from deploycompress.subclasses import SubclassError

    net = _net(std=False)
    net.extra = cls(12, 12, 1)
    with pytest.raises(EngineError, match=rf"'extra' \({cls.__name__}.*{why}"):
        build_engine(net, example_inputs=X[:1], precision="fp32", out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    q = PTQQuantizer(net, [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"]}])
    with pytest.raises(SubclassError, match=rf"'extra' \({cls.__name__}"):
        q.calibrate([X])


def test_a_weight_computed_in_forward_is_not_quantized_as_the_parameter():
    from deploycompress.quantization import PTQQuantizer, QuantizerError

    q = PTQQuantizer(_net(), [{"op_types": ["Conv2d"], "quant_types": ["weight"]}])
    with pytest.raises(QuantizerError, match=r"'conv3' \(StdConv2d\) computes its weight in forward.*lower_layers"):
        q.calibrate([X])


# ---------------------------------------------------------------------------------------------- PTQ
def _fake_quant(t, scale, zp, qmin, qmax):
    return (torch.clamp(torch.round(t / scale) + zp, qmin, qmax) - zp) * scale


def test_ptq_simulates_subclasses_as_their_forward_with_quantized_input_and_weight():
    """Oracle: each subclass's own forward run on a fake-quantized input and weight, written here."""
    from deploycompress.quantization import PTQQuantizer

    net = _net(std=False, scaled=True)
    sim = _net(std=False, scaled=True)
    q = PTQQuantizer(sim, [{"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "granularity": "per_tensor"}])
    q.calibrate([X])
    calib = q.export_calib_config()
    assert sorted(calib.modules) == sorted(WEIGHTED)
    inputs = {}
    hooks = [net.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0])) for n in WEIGHTED]
    net(X)
    for h in hooks:
        h.remove()
    for name in WEIGHTED:
        module = net.get_submodule(name)
        x = inputs[name]
        lo, hi = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
        s_x = max(abs(lo), abs(hi)) / 127
        w = module.weight.detach()
        s_w = float(w.abs().max()) / 127
        expected = torch.func.functional_call(module, {"weight": _fake_quant(w, s_w, 0, -127, 127)}, (_fake_quant(x, s_x, 0, -128, 127),))
        got = sim.get_submodule(name)(x)
        assert torch.allclose(got, expected, atol=1e-5), name


# ---------------------------------------------------------------------------------------------- pruning + speedup
def _masked_by_hand(net: nn.Module, masks: dict) -> nn.Module:
    """The user's masked model: masks multiplied into exactly the tensors they name."""
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        for name, per in masks.items():
            module = out.get_submodule(name)
            for pname, mask in per.items():
                getattr(module, pname).mul_(mask.to(getattr(module, pname).dtype))
    return out


@pytest.mark.parametrize("pruner_name", ["L1NormPruner", "FPGMPruner"])
def test_pruners_and_speedup_follow_subclasses_exactly(pruner_name):
    import deploycompress.pruning as pruning
    from deploycompress.speedup import speedup
    from deploycompress.subclasses import LayerLoweredWarning

    net = _net(scaled=True)
    pruner = getattr(pruning, pruner_name)(
        _net(scaled=True), [{"op_types": ["Conv2d"], "sparsity": 0.5}, {"op_names": ["fc"], "exclude": True}],
        dependency_aware=True, dummy_input=X,
    )
    result = pruner.compress()
    masks = result[1] if isinstance(result, tuple) else result
    assert set(masks) >= {"stem", "dw", "pw", "conv3", "extra"}
    reference = _masked_by_hand(net, masks)
    with pytest.warns(LayerLoweredWarning, match="conv3"):
        small = speedup(net, masks, X)
    assert isinstance(small.stem, StaticSamePadConv2d) and isinstance(small.extra, ScaledConv2d)  # forwards kept
    assert type(small.conv3) is nn.Conv2d  # its standardised weight baked
    assert small.pw.out_channels == 6 and small.conv3.out_channels == 6 and small.extra.out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(small(X), reference(X), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- build_engine
def _count(model_path, op_types):
    import onnx

    return sum(n.op_type in op_types for n in onnx.load(str(model_path)).graph.node)


def test_build_engine_int8_runs_every_subclass_layer_in_int8(tmp_path):
    import onnxruntime as ort

    from deploycompress import build_engine

    net = _net()
    calib = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    art = build_engine(net, example_inputs=X[:1], out_dir=tmp_path / "b", calib_data=calib, eval_inputs=X, iterations=3,
                       warmup=1, progress=False, strict=True)
    audit = art.report.quantized_layers
    assert audit["requested"] == 6 and audit["in_qdq"] == 6 and audit["in_optimized"] == 6 and not audit["short"]
    # the optimized graph onnxruntime saved: five integer convs and one integer Gemm, no float Conv left
    assert _count(art.artifact_path, ("QLinearConv",)) == 5
    assert _count(art.artifact_path, ("QGemm", "QLinearMatMul", "MatMulInteger")) == 1
    assert _count(art.artifact_path, ("Conv", "Gemm", "MatMul")) == 0
    # the deployed int8 graph follows the PyTorch model (StdConv2d baked, pads kept)
    sess = ort.InferenceSession(str(art.artifact_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0])
    with torch.no_grad():
        want = net(X)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())


def test_fewer_int8_layers_than_asked_warns_and_strict_fails(tmp_path):
    from deploycompress import build_engine
    from deploycompress.precision_audit import PrecisionShortfallError, PrecisionShortfallWarning

    net = _net(std=False, scaled=True)
    # 'fc' gets a weight calibration but no input calibration: it cannot run in int8; 'extra' multiplies its
    # conv's output by a scale, so no quantized output follows the conv and onnxruntime keeps it float
    config = [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"]}, {"op_names": ["fc"], "quant_types": ["weight"]}]
    kw = dict(example_inputs=X[:1], calib_data=[X], quant_config_list=config, iterations=2, warmup=1, progress=False)
    with pytest.warns(PrecisionShortfallWarning, match=r"2 of 6 weighted layers do not run in int8") as record:
        art = build_engine(net, out_dir=tmp_path / "warn", **kw)
    message = next(str(w.message) for w in record if w.category is PrecisionShortfallWarning)
    assert "fc: node /fc/Gemm (Gemm) takes a float input" in message
    assert "extra: onnxruntime did not fuse its Q/DQ into an integer kernel" in message
    audit = art.report.quantized_layers
    assert sorted(audit["short"]) == ["extra", "fc"] and audit["in_qdq"] == 5 and audit["in_optimized"] == 4
    assert _count(art.artifact_path, ("QLinearConv",)) == 4
    assert any("not in int8" in note for note in art.report.notes)
    with pytest.raises(PrecisionShortfallError, match="fc"):
        build_engine(net, out_dir=tmp_path / "strict", strict=True, **kw)
    assert not (tmp_path / "strict").exists()


def test_multihead_attention_out_proj_is_a_named_exception_of_the_precision_audit(tmp_path):
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` itself (never calls out_proj), so the quantizer cannot
    wrap it: the audit names it with the reason, and ``strict`` still builds the layers that can run in int8."""
    import onnx
    from onnx import numpy_helper

    from deploycompress import build_engine
    from deploycompress.quantization import CalibConfig
    from deploycompress.quantization.quantizer import UncalledModuleWarning

    torch.manual_seed(0)
    net = MHANet().eval()
    x = torch.randn(2, 5, 8)
    calib = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    kw = dict(example_inputs=x[:1], iterations=1, warmup=0, compare_fp32=False, progress=False, strict=True)
    with pytest.warns(UncalledModuleWarning, match="attn.out_proj"):
        art = build_engine(net, out_dir=tmp_path / "b", calib_data=calib, **kw)
    audit = art.report.quantized_layers
    assert list(audit["exceptions"]) == ["attn.out_proj"]
    assert "MultiheadAttention" in audit["exceptions"]["attn.out_proj"]
    assert audit["requested"] == 2 and audit["in_optimized"] == 2 and not audit["short"]
    assert any("attn.out_proj (never called" in n for n in art.report.notes)
    # the graph itself: two int8 weights (embed's, head's); out_proj's (16, 16) stays a float initializer
    qdq = onnx.load(str(art.out_dir / "source" / "model.qdq.onnx"))
    shapes = {dt: sorted(tuple(numpy_helper.to_array(i).shape) for i in qdq.graph.initializer if i.data_type == dt and len(i.dims) == 2)
              for dt in (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT)}
    assert len(shapes[onnx.TensorProto.INT8]) == 2 and (16, 16) not in shapes[onnx.TensorProto.INT8]
    assert (16, 16) in shapes[onnx.TensorProto.FLOAT]
    # the exception travels with the calibration file
    path = art.calib_config.save(tmp_path / "calib.json")
    again = build_engine(net, calib_config=CalibConfig.load(path), out_dir=tmp_path / "c", **kw)
    assert again.report.quantized_layers["exceptions"] == audit["exceptions"]

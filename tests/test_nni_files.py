"""NNI users' files, written here in NNI's exact layouts, loaded, speeded up and built unchanged.

The fixtures follow NNI's source (github.com/microsoft/nni), never this project's code:
- NNI 3.0 masks: ``Compressor.compress()`` returns ``generate_sparsity``'s ``defaultdict(dict)`` of float
  0/1 masks (nni/compression/pruning/tools/sparse_gen.py), ``'bias': None`` for a layer without bias;
- NNI 2.x masks: ``Pruner.export_model(mask_path=...)`` ``torch.save``s ``{name: {'weight': ..., 'bias': ...}}``
  (nni/compression/pytorch/compressor.py);
- NNI 3.0 calibration: ``Compressor.get_calibration_config`` (nni/compression/base/compressor.py), scale
  and zero point from ``compute_scale_zp`` (nni/compression/quantization/ptq_quantizer.py) on NNI's
  grid (``_compute_qmin_qmax``, nni/compression/base/target_space.py: intB is -(2**(B-1))+1 .. 2**(B-1)-1);
- NNI 2.x calibrations: each quantizer's ``export_model`` in nni/algorithms/compression/pytorch/quantization/
  (qat_quantizer.py, observer_quantizer.py, lsq_quantizer.py, dorefa_quantizer.py, bnn_quantizer.py),
  activations rebuilt with qat_quantizer.py ``update_quantization_param``.
"""

from __future__ import annotations

import collections
import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import deploycompress as dc
from deploycompress.config import ConfigConventionWarning, ConfigError, select_modules, validate_config_list
from deploycompress.pruning import L1NormPruner, LevelPruner, load_masks
from deploycompress.pruning.io import MaskError
from deploycompress.quantization import CalibConfig, CalibConfigError, NNIImportWarning


class TorchvisionStyleNet(nn.Module):
    """Convs without bias (as torchvision writes them), a BatchNorm, a pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _net() -> TorchvisionStyleNet:
    torch.manual_seed(0)
    net = TorchvisionStyleNet()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
    return net.eval()


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
PRUNED = [1, 4, 6]  # conv2's output channels an NNI pruner removed


def _nni3_masks() -> collections.defaultdict:
    masks: collections.defaultdict = collections.defaultdict(dict)
    w = torch.ones(8, 8, 3, 3)
    w[PRUNED] = 0.0
    masks["conv2"]["weight"] = w
    masks["conv2"]["bias"] = None
    return masks


def _user_masked_model(model: nn.Module) -> nn.Module:
    """The model the user validated in NNI: the mask multiplied into exactly conv2.weight."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.conv2.weight[PRUNED] = 0.0
    return masked


# ------------------------------------------------------------------------------------------------ masks
def test_nni3_defaultdict_masks_with_none_load_and_speed_up_exactly(tmp_path):
    model = _net()
    torch.save(_nni3_masks(), tmp_path / "masks.pth")
    masks = load_masks(tmp_path / "masks.pth", model)
    assert type(masks) is dict and set(masks["conv2"]) == {"weight"}  # 'bias': None means no mask
    assert masks["conv2"]["weight"].dtype == torch.bool and int((~masks["conv2"]["weight"]).sum()) == 3 * 72

    small = dc.speedup(model, masks, X)
    assert small.conv2.out_channels == 5 and small.fc.in_features == 5
    with torch.no_grad():
        torch.testing.assert_close(small(X), _user_masked_model(model)(X), rtol=1e-5, atol=1e-5)
    # the speedup takes NNI's in-memory dict (defaultdict, None entries) as it is, too
    small2 = dc.speedup(model, _nni3_masks(), X)
    with torch.no_grad():
        torch.testing.assert_close(small2(X), small(X), rtol=0, atol=0)


def test_nni_masks_on_a_conv_before_batchnorm_stay_exact():
    """NNI masks conv1 only; its BatchNorm still emits a constant there: speedup keeps those channels."""
    model = _net()
    masks = collections.defaultdict(dict)
    masks["conv1"]["weight"] = torch.ones(8, 3, 3, 3)
    masks["conv1"]["weight"][PRUNED] = 0.0
    masks["conv1"]["bias"] = None
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.conv1.weight[PRUNED] = 0.0
    with pytest.warns(UserWarning, match="conv1 keeps 3"):
        small = dc.speedup(model, masks, X)
    with torch.no_grad():
        torch.testing.assert_close(small(X), masked(X), rtol=1e-5, atol=1e-5)


def test_nni2_export_model_masks_load(tmp_path):
    model = _net()
    w = torch.ones(8, 8, 3, 3)
    w[PRUNED] = 0.0
    torch.save({"conv2": {"weight": w, "bias": None}}, tmp_path / "mask.pth")  # compressor.py export_model
    masks = load_masks(tmp_path / "mask.pth", model)
    assert torch.equal(masks["conv2"]["weight"], w.bool())


def test_mask_files_allow_only_nni_defaultdict(tmp_path):
    torch.save(collections.defaultdict(list, {"conv1": {}}), tmp_path / "list.pth")
    with pytest.raises(MaskError, match="Unsupported global: GLOBAL list"):
        load_masks(tmp_path / "list.pth")
    torch.save({"conv1": {"weight": collections.OrderedDict()}}, tmp_path / "od.pth")
    with pytest.raises(MaskError, match="mask conv1.weight must be a tensor, got OrderedDict"):
        load_masks(tmp_path / "od.pth")
    # outside the load nothing stays allowed
    torch.save(collections.defaultdict(dict, {"a": {}}), tmp_path / "dd.pth")
    with pytest.raises(Exception, match="defaultdict"):
        torch.load(tmp_path / "dd.pth", weights_only=True)


# ------------------------------------------------------------------------------------ NNI 3.0 calibration
def _nni3_qrange(dtype: str) -> tuple[int, int]:
    bits = int(dtype.lstrip("uint"))
    return (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if dtype.startswith("int") else (0, 2**bits - 1)


def _nni3_scale_zp(tmin: torch.Tensor, tmax: torch.Tensor, dtype: str, scheme: str):
    """nni/compression/quantization/ptq_quantizer.py compute_scale_zp, verbatim in torch."""
    qmin, qmax = _nni3_qrange(dtype)
    tmin = torch.min(tmin, torch.zeros_like(tmin))
    tmax = torch.max(tmax, torch.zeros_like(tmax))
    zero_point = torch.zeros_like(tmin)
    if scheme in ["symmetric", None]:
        abs_max = torch.max(torch.abs(tmin), torch.abs(tmax))
        scale = abs_max / (float(qmax - qmin) / 2)
        scale = torch.max(scale, torch.full_like(scale, torch.finfo(torch.float32).eps))
        zero_point = torch.full_like(zero_point, (qmax + qmin + 1) // 2)
    else:
        scale = (tmax - tmin) / float(qmax - qmin)
        scale = torch.max(scale, torch.full_like(scale, torch.finfo(torch.float32).eps))
        zero_point = qmin - torch.round(tmin / scale)
    return scale, torch.clamp(zero_point, qmin, qmax)


def _nni3_calibration(model: nn.Module) -> collections.defaultdict:
    """What NNI 3.0's PtqQuantizer(config: int8 symmetric out_channel weights, uint8 affine activations)
    returns: per module, per target, with tracked ranges observed on X."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.update({n: i[0].detach()}))
             for n in ("conv1", "conv2", "fc")]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    calib: collections.defaultdict = collections.defaultdict(dict)
    for name in ("conv1", "conv2", "fc"):
        w = getattr(model, name).weight.detach()
        view = [-1] + [1] * (w.dim() - 1)  # the scaler's keepdim shape: [C, 1, 1, 1]
        wmin, wmax = w.reshape(w.shape[0], -1).amin(1).view(view), w.reshape(w.shape[0], -1).amax(1).view(view)
        s, z = _nni3_scale_zp(wmin, wmax, "int8", "symmetric")
        calib[name]["weight"] = {"scale": s, "zero_point": z, "quant_dtype": "int8", "quant_scheme": "symmetric",
                                 "quant_bits": 8, "tracked_min": wmin, "tracked_max": wmax}
        x = seen[name]
        s, z = _nni3_scale_zp(x.amin(), x.amax(), "uint8", "affine")
        calib[name]["_input_0"] = {"scale": s, "zero_point": z, "quant_dtype": "uint8", "quant_scheme": "affine",
                                   "quant_bits": 8, "tracked_min": x.amin(), "tracked_max": x.amax()}
    return calib


def test_nni3_calibration_keeps_every_scale_and_zero_point():
    model = _net()
    nni = _nni3_calibration(model)
    calib = CalibConfig.from_dict(nni)
    assert calib.provenance["format"] == "nni-3.0" and len(calib) == 6
    for name, targets in nni.items():
        for target, entry in targets.items():
            kind = {"weight": "weight", "_input_0": "input"}[target]
            p = calib.get(name, kind)
            np.testing.assert_array_equal(p.scale, entry["scale"].reshape(-1).numpy())
            np.testing.assert_array_equal(p.zero_point, entry["zero_point"].reshape(-1).numpy().astype(np.int64))
            assert (p.dtype, p.bits) == (("int", 8) if kind == "weight" else ("uint", 8))  # affine uint8 stays uint8
            assert p.axis == (0 if kind == "weight" else None)
            assert calib.provenance["tensors"][f"{name}.{kind}"]["quant_dtype"] == entry["quant_dtype"]
    # a JSON round trip keeps values and provenance
    again = CalibConfig.from_dict(calib.to_dict())
    assert again.provenance == calib.provenance and again.get("conv2", "input") == calib.get("conv2", "input")


def test_nni3_calibration_errors_name_module_and_target():
    bad = {"conv1": {"bias": {"scale": torch.tensor(1.0), "zero_point": torch.tensor(0.0), "quant_dtype": "int8"}}}
    with pytest.raises(CalibConfigError, match=r"conv1.bias: target 'bias' cannot be deployed"):
        CalibConfig.from_dict(bad)
    none = {"conv1": {"weight": {"scale": None, "zero_point": None, "quant_dtype": "int8", "quant_scheme": None}}}
    with pytest.raises(CalibConfigError, match=r"conv1.weight: 'scale' is None"):
        CalibConfig.from_dict(none)


def test_nni3_files_build_an_onnxruntime_int8_bundle_with_nnis_scales(tmp_path):
    """defaultdict masks + defaultdict calibration, both torch.save'd, through build_engine unchanged."""
    model = _net()
    nni_calib = _nni3_calibration(_user_masked_model(model))
    torch.save(_nni3_masks(), tmp_path / "masks.pth")
    torch.save(nni_calib, tmp_path / "calibration.pth")
    art = dc.build_engine(
        model, tmp_path / "masks.pth", tmp_path / "calibration.pth", example_inputs=X[:1], precision="int8",
        out_dir=tmp_path / "bundle", eval_inputs=X, iterations=3, warmup=1, compare_fp32=False, progress=False,
    )
    assert art.calib_config.provenance["format"] == "nni-3.0"
    assert art.calib_config.provenance["source"].endswith("calibration.pth")
    graph = onnx.load(art.artifact_path).graph  # onnxruntime-optimized: QLinearConv, QGemm, Q/DQ
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    scales = {n[: -len("_scale")]: v for n, v in init.items() if n.endswith("_scale")}
    pairs = {(float(v), int(init[f"{k}_zero_point"])) for k, v in scales.items() if v.size == 1 and f"{k}_zero_point" in init}
    for name in ("conv1", "conv2", "fc"):  # activations: NNI's uint8 affine scale and zero point deploy as they are
        s = float(nni_calib[name]["_input_0"]["scale"])
        z = int(nni_calib[name]["_input_0"]["zero_point"])
        assert any(zz == z and abs(ss - s) <= 1e-6 * s for ss, zz in pairs), (name, s, z, sorted(pairs))
    # fc kept its 5 output channels: its per-channel int8 weight scales are NNI's
    np.testing.assert_allclose(scales["fc.weight"], nni_calib["fc"]["weight"]["scale"].reshape(-1).numpy(), rtol=1e-6)
    with torch.no_grad():  # speedup reproduced the masked model NNI calibrated
        torch.testing.assert_close(art.model(X), _user_masked_model(model)(X), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ NNI 2.x calibration
def _nni2_from_range(bits, rmin, rmax, dtype, scheme):
    """nni/algorithms/compression/pytorch/quantization/qat_quantizer.py update_quantization_param, with
    nni/compression/pytorch/quantization/utils.py calculate_qmin_qmax."""
    rmin, rmax = torch.tensor(rmin, dtype=torch.float64), torch.tensor(rmax, dtype=torch.float64)
    qmin, qmax = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if dtype == "int" else (0, 2**bits - 1)
    rmin, rmax = torch.min(rmin, torch.zeros_like(rmin)), torch.max(rmax, torch.zeros_like(rmax))
    zero_point = torch.zeros_like(rmin)
    if scheme in ("per_tensor_symmetric", "per_channel_symmetric"):
        scale = torch.max(torch.abs(rmin), torch.abs(rmax)) / (float(qmax - qmin) / 2)
        if dtype == "uint":
            zero_point = zero_point.new_full(zero_point.size(), (qmin + qmax) // 2)
    else:
        scale = (rmax - rmin) / float(qmax - qmin)
        zero_point = qmin - torch.round(rmin / scale)
    return float(scale), int(torch.clamp(zero_point, qmin, qmax))


def _check(p, scale, zp, dtype, bits):
    np.testing.assert_allclose(p.scale, np.float32(scale), rtol=1e-7)
    assert p.zero_point.tolist() == np.broadcast_to(zp, p.scale.shape).tolist() and (p.dtype, p.bits) == (dtype, bits)


def test_nni2_qat_export_keeps_uint8_affine_activations():
    w_scale = torch.tensor([0.01, 0.02, 0.015]).view(3, 1, 1, 1)  # per_channel_symmetric int weights
    qat = {
        "conv1": {"weight_bits": 8, "weight_scale": w_scale, "weight_zero_point": torch.zeros(3, 1, 1, 1),
                  "input_bits": 8, "tracked_min_input": -0.7, "tracked_max_input": 2.3},
        "relu": {"output_bits": 8, "tracked_min_output": 0.0, "tracked_max_output": 5.1},
    }
    calib = CalibConfig.from_dict(qat)
    assert calib.provenance["quantizer"] == "qat"
    _check(calib.get("conv1", "weight"), w_scale.reshape(-1).numpy(), 0, "int", 8)
    assert calib.get("conv1", "weight").axis == 0
    _check(calib.get("conv1", "input"), *_nni2_from_range(8, -0.7, 2.3, "uint", "per_tensor_affine"), "uint", 8)
    _check(calib.get("relu", "output"), *_nni2_from_range(8, 0.0, 5.1, "uint", "per_tensor_affine"), "uint", 8)
    # what the 2.x config_list said overrides the defaults
    sym = CalibConfig.from_nni(qat, quant_dtype="int", quant_scheme="per_tensor_symmetric")
    _check(sym.get("conv1", "input"), *_nni2_from_range(8, -0.7, 2.3, "int", "per_tensor_symmetric"), "int", 8)
    u_sym = CalibConfig.from_nni(qat, quant_dtype={"input": "uint"}, quant_scheme={"input": "per_tensor_symmetric"})
    _check(u_sym.get("conv1", "input"), *_nni2_from_range(8, -0.7, 2.3, "uint", "per_tensor_symmetric"), "uint", 8)
    assert u_sym.get("conv1", "input").zero_point[0] == 127  # 2.x: (qmin + qmax) // 2, not 3.0's 128


def test_nni2_observer_export():
    ws, xs, xz = 0.004, 0.02, 10  # observer_quantizer.py: weights -127..127, activations 0..127 (reduce_range)
    obs = {"conv1": {
        "weight_bits": 8, "tracked_max_weight": ws * 127, "tracked_min_weight": -ws * 127,
        "tracked_qmin_weight": -127, "tracked_qmax_weight": 127,
        "input_bits": 8, "tracked_min_input": xs * (0 - xz), "tracked_max_input": xs * (127 - xz),
        "tracked_qmin_input": 0, "tracked_qmax_input": 127,
    }}
    calib = CalibConfig.from_dict(obs)
    assert calib.provenance["quantizer"] == "observer"
    _check(calib.get("conv1", "weight"), ws, 0, "int", 8)
    _check(calib.get("conv1", "input"), xs, xz, "uint", 8)


def test_nni2_lsq_export_without_weight_scales():
    xs = 0.03  # lsq_quantizer.py: tracked_min_input = -input_scale * qmax, qmax = 127 (qmin = -128)
    lsq = {"conv1": {"weight_bits": 8, "input_bits": 8, "tracked_min_input": -xs * 127, "tracked_max_input": xs * 127}}
    with pytest.warns(NNIImportWarning, match=r"does not write the learned weight scales.*\['conv1'\]"):
        calib = CalibConfig.from_dict(lsq)
    assert calib.provenance["quantizer"] == "lsq" and calib.get("conv1", "weight") is None
    _check(calib.get("conv1", "input"), xs, 0, "int", 8)
    model = _net()
    with pytest.warns(NNIImportWarning):
        with_model = CalibConfig.from_nni(lsq, model=model)
    amax = float(model.conv1.weight.detach().abs().max())
    _check(with_model.get("conv1", "weight"), amax / 127, 0, "int", 8)


def test_nni2_dorefa_and_bnn_exports_need_the_quantizer_named():
    only_bits = {"conv1": {"weight_bits": 4}, "conv2": {"weight_bits": 4}}
    with pytest.raises(CalibConfigError, match="pass quantizer='dorefa' or quantizer='bnn'"):
        CalibConfig.from_dict(only_bits)
    dorefa = CalibConfig.from_nni(only_bits, quantizer="dorefa")
    # dorefa_quantizer.py: w = 2 * round(u * (2**k - 1)) / (2**k - 1) - 1: odd multiples of 1 / 15
    _check(dorefa.get("conv1", "weight"), 1 / 15, 0, "int", 5)
    bnn = CalibConfig.from_nni({"conv1": {"weight_bits": 1}}, quantizer="bnn")  # bnn_quantizer.py: sign(w)
    _check(bnn.get("conv1", "weight"), 1.0, 0, "int", 2)
    with pytest.raises(CalibConfigError, match="quantizer must be one of"):
        CalibConfig.from_nni(only_bits, quantizer="DoReFa")


def test_nni2_calibration_file_loads_from_torch_save(tmp_path):
    qat = {"fc": {"weight_bits": 8, "weight_scale": torch.tensor([0.05]), "weight_zero_point": torch.tensor([0.0])}}
    torch.save(qat, tmp_path / "calibration.pth")  # compressor.py export_model_save
    calib = CalibConfig.load(tmp_path / "calibration.pth")
    assert calib.provenance["source"].endswith("calibration.pth") and calib.get("fc", "weight").scale[0] == np.float32(0.05)
    calib.save(tmp_path / "calib.json")
    assert CalibConfig.load(tmp_path / "calib.json").provenance == calib.provenance


# ----------------------------------------------------------------------------------------- config_lists
def test_nni3_quantization_config_with_targets():
    model = _net()
    cfg = [{"op_types": ["Conv2d"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "uint8",
            "quant_scheme": "affine", "granularity": "default",
            "target_settings": {"weight": {"quant_dtype": "uint4"}}}]
    mc = select_modules(model, cfg, kind="quantization")["conv1"]
    assert mc.quant_types == ("input", "weight", "output") and mc.quant_bits == {"input": 8, "weight": 4, "output": 8}
    assert (mc.quant_dtype, mc.quant_scheme, mc.granularity) == ("uint", "affine", "per_tensor")
    per_channel = [{"op_types": ["Conv2d"], "target_names": ["weight"], "quant_dtype": "int8", "granularity": "out_channel"}]
    assert select_modules(model, per_channel, kind="quantization")["conv2"].granularity == "per_channel"
    with pytest.raises(ConfigError, match="quant_scheme differs between targets"):
        validate_config_list([{"op_types": ["Conv2d"], "target_names": ["_input_", "weight"], "quant_dtype": "int8",
                               "target_settings": {"weight": {"quant_scheme": "symmetric"}, "_input_": {"quant_scheme": "affine"}}}])
    with pytest.raises(ConfigError, match="quantization target '_input_1' is not supported"):
        validate_config_list([{"op_types": ["Conv2d"], "target_names": ["_input_1"], "quant_dtype": "int8"}])
    # NNI 3.0: a later dict only adds targets the first left unset
    both = [{"op_names": ["conv1"], "target_names": ["weight"], "quant_dtype": "int8"},
            {"op_types": ["Conv2d"], "target_names": ["weight", "_input_"], "quant_dtype": "int4"}]
    got = select_modules(model, both, kind="quantization")
    assert got["conv1"].quant_bits == {"weight": 8, "input": 4} and got["conv2"].quant_bits == {"weight": 4, "input": 4}
    # and such a list drives a quantizer as it is
    q = dc.PTQQuantizer(copy.deepcopy(model), [{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight"],
                                                "quant_dtype": "int8", "quant_scheme": "symmetric"}])
    q.calibrate([X])
    assert q.export_calib_config().get("fc", "input") is not None


def test_nni3_pruning_config_keys():
    model = _net()
    cfg = [{"op_types": ["Conv2d"], "target_names": ["weight", "bias"],
            "target_settings": {"weight": {"sparse_ratio": 0.5, "max_sparse_ratio": 0.25, "granularity": "out_channel"},
                                "bias": {"align": {"module_name": None, "target_name": "weight", "dims": [0]}}}}]
    assert {n: c.sparsity for n, c in select_modules(model, cfg, kind="pruning").items()} == {"conv1": 0.25, "conv2": 0.25}
    # op_names_re matches from the start of the name, as NNI's re.match: 'conv' selects conv1 and conv2
    sel = select_modules(model, [{"op_names_re": ["conv"], "sparse_ratio": 0.5, "exclude_op_names_re": [".*2$"]}], kind="pruning")
    assert list(sel) == ["conv1"]
    # op_names and op_names_re are a union (then intersected with op_types)
    sel = select_modules(model, [{"op_names": ["fc"], "op_names_re": ["conv2"], "op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}])
    assert list(sel) == ["conv2", "fc"]
    # first dict wins in an NNI 3.0 list, the last in an NNI 2.x list
    nni3 = [{"op_names": ["conv1"], "sparse_ratio": 0.75}, {"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    nni2 = [{"op_types": ["Conv2d"], "sparsity": 0.5}, {"op_names": ["conv1"], "sparsity": 0.75}]
    assert select_modules(model, nni3)["conv1"].sparsity == 0.75 and select_modules(model, nni2)["conv1"].sparsity == 0.75
    assert select_modules(model, nni3)["conv2"].sparsity == 0.5
    # NNI's own helper output (nni/compression/utils/dependency.py auto_set_denpendency_group_ids)
    helper = [{"op_names": ["conv1"], "sparse_ratio": 0.5, "dependency_group_id": 0, "internal_metric_block": 1},
              {"op_names": ["conv2"], "sparse_ratio": 0.5, "dependency_group_id": 1, "internal_metric_block": 1}]
    with pytest.raises(ConfigError, match="pass dependency_aware=True"):
        L1NormPruner(copy.deepcopy(model), helper)
    with pytest.raises(ConfigError, match="LevelPruner prunes single weights"):
        LevelPruner(copy.deepcopy(model), helper)
    _, masks = L1NormPruner(copy.deepcopy(model), helper, dependency_aware=True, dummy_input=X[:1]).compress()
    assert int((~masks["conv1"]["weight"]).any(dim=(1, 2, 3)).sum()) == 4


def test_exclude_is_global_and_says_when_nni2_differed():
    model = _net()
    first = [{"exclude": True, "op_names": ["conv2"]}, {"op_types": ["Conv2d"], "sparsity": 0.5}]
    with pytest.warns(ConfigConventionWarning, match=r"\['conv2'\] are excluded by an 'exclude' dict and selected again"):
        assert list(select_modules(model, first)) == ["conv1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exclude placed last: both generations agree, nothing to say
        assert list(select_modules(model, first[::-1])) == ["conv1"]


def test_sparse_ratio_one_and_nni_rounding():
    with pytest.warns(ConfigConventionWarning, match="sparse_ratio 1.0 zeroes whole layers in NNI 3.0"):
        _, masks = L1NormPruner(_net(), [{"op_names": ["conv1"], "sparse_ratio": 1.0}]).compress()
    assert int((~masks["conv1"]["weight"]).any(dim=(1, 2, 3)).sum()) == 7  # one channel kept
    with pytest.raises(ConfigError, match=r"'sparsity' must lie in \[0, 1\)"):
        validate_config_list([{"op_types": ["Conv2d"], "sparsity": 1.0}])
    # 0.29 of 100 channels: NNI's int(100 * 0.29) is 28 (float noise), here 29 unless sparse_rounding='nni'
    wide = nn.Sequential(nn.Linear(4, 100), nn.ReLU(), nn.Linear(100, 2))
    counts = {}
    for rounding in ("floor", "nni"):
        cfg = [{"op_names": ["0"], "sparse_ratio": 0.29, "sparse_rounding": rounding}]
        _, masks = L1NormPruner(copy.deepcopy(wide), cfg).compress()
        counts[rounding] = int((~masks["0"]["weight"]).all(dim=1).sum())
    assert counts == {"floor": 29, "nni": int(100 * 0.29)} and int(100 * 0.29) == 28


def test_both_spellings_select_the_same():
    model = _net()
    v2 = [{"op_types": ["Conv2d"], "sparsity": 0.5}, {"exclude": True, "op_names": ["conv2"]}]
    # NNI 3.0 trans_legacy_config_list's translation of v2 (nni/compression/base/config.py)
    v3 = [{"op_types": ["Conv2d"], "exclude_op_names": ["conv2"], "exclude_op_types": [], "exclude_op_names_re": [],
           "target_names": ["weight", "bias"], "target_settings": {"weight": {"sparse_ratio": 0.5, "granularity": "default"}}}]
    a, b = select_modules(model, v2, kind="pruning"), select_modules(model, v3, kind="pruning")
    assert {n: c.sparsity for n, c in a.items()} == {n: c.sparsity for n, c in b.items()} == {"conv1": 0.5}


def test_cli_builds_from_nni3_files(tmp_path):
    """`deploycompress build --masks <NNI 3.0 masks> --calib <NNI 3.0 calibration>`, both torch.save'd."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.save(_nni3_masks(), tmp_path / "masks.pth")
    torch.save(_nni3_calibration(_user_masked_model(_net())), tmp_path / "calibration.pth")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    proc = subprocess.run(
        [sys.executable, "-m", "deploycompress.cli", "build", "--model", "test_nni_files:_net", "--input-shape", "1,3,12,12",
         "--masks", str(tmp_path / "masks.pth"), "--calib", str(tmp_path / "calibration.pth"), "--iterations", "3",
         "--out", str(tmp_path / "bundle"), "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    calib = json.loads((tmp_path / "bundle" / "calibration.json").read_text())
    assert calib["provenance"]["format"] == "nni-3.0" and calib["provenance"]["source"].endswith("calibration.pth")


def _observed_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.update({n: i[0].detach()}))
             for n in ("conv1", "conv2", "fc")]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    return seen


def _nni2_export(quantizer: str, model: nn.Module) -> tuple[dict, dict]:
    """(the dict NNI 2.x's export_model writes, {module: (scale, zero_point, dtype)} NNI used for the input)."""
    seen, out, expect = _observed_inputs(model), {}, {}
    for name in ("conv1", "conv2", "fc"):
        w = getattr(model, name).weight.detach()
        lo, hi = float(seen[name].min()), float(seen[name].max())
        if quantizer == "qat":  # per_channel_symmetric int weights, default uint8 affine activations
            amax = w.reshape(w.shape[0], -1).abs().amax(1)
            out[name] = {"weight_bits": 8, "weight_scale": (amax / 127).view(-1, *[1] * (w.dim() - 1)),
                         "weight_zero_point": torch.zeros(w.shape[0], *[1] * (w.dim() - 1)),
                         "input_bits": 8, "tracked_min_input": lo, "tracked_max_input": hi}
            expect[name] = (*_nni2_from_range(8, lo, hi, "uint", "per_tensor_affine"), "uint")
        elif quantizer == "observer":  # observer_quantizer.py: weight qint8 -127..127, input quint8 0..127
            ws = float(w.abs().max()) / 127
            xs = (max(hi, 0.0) - min(lo, 0.0)) / 127
            xz = int(round(-min(lo, 0.0) / xs))
            out[name] = {"weight_bits": 8, "tracked_max_weight": ws * 127, "tracked_min_weight": -ws * 127,
                         "tracked_qmin_weight": -127, "tracked_qmax_weight": 127,
                         "input_bits": 8, "tracked_min_input": xs * (0 - xz), "tracked_max_input": xs * (127 - xz),
                         "tracked_qmin_input": 0, "tracked_qmax_input": 127}
            expect[name] = (xs, xz, "uint")
        else:  # lsq_quantizer.py: abs_max_input = input_scale * 127, no weight scale written
            xs = max(abs(lo), abs(hi)) / 127
            out[name] = {"weight_bits": 8, "input_bits": 8, "tracked_min_input": -xs * 127, "tracked_max_input": xs * 127}
            expect[name] = (xs, 0, "int")
    return out, expect


@pytest.mark.parametrize("quantizer", ["qat", "observer", "lsq"])
def test_nni2_files_build_an_onnxruntime_int8_bundle(quantizer, tmp_path):
    model = _net()
    w = torch.ones(8, 8, 3, 3)
    w[PRUNED] = 0.0
    torch.save({"conv2": {"weight": w, "bias": None}}, tmp_path / "mask.pth")  # 2.x export_model(mask_path=...)
    export, expect = _nni2_export(quantizer, _user_masked_model(model))
    torch.save(export, tmp_path / "calibration.pth")  # 2.x export_model(calibration_path=...)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        art = dc.build_engine(
            model, tmp_path / "mask.pth", tmp_path / "calibration.pth", example_inputs=X[:1], precision="int8",
            out_dir=tmp_path / "bundle", eval_inputs=X, iterations=3, warmup=1, compare_fp32=False, progress=False,
        )
    # LSQ: NNI did not export the weight scales; the build derived them from the model, and said so
    assert any(issubclass(c.category, NNIImportWarning) for c in caught) == (quantizer == "lsq")
    calib = art.calib_config
    assert calib.provenance["quantizer"] == quantizer and calib.get("fc", "weight") is not None
    for name, (s, z, dtype) in expect.items():
        p = calib.get(name, "input")
        assert p.dtype == dtype and p.zero_point[0] == z
        np.testing.assert_allclose(p.scale[0], s, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(art.model(X), _user_masked_model(model)(X), rtol=1e-5, atol=1e-5)
    if quantizer == "qat":  # uint8 affine, onnxruntime's own flavour: NNI's numbers are in the graph
        init = {t.name: numpy_helper.to_array(t) for t in onnx.load(art.artifact_path).graph.initializer}
        pairs = {(float(v), int(init[n[:-6] + "_zero_point"])) for n, v in init.items()
                 if n.endswith("_scale") and v.size == 1 and n[:-6] + "_zero_point" in init}
        for name, (s, z, _) in expect.items():
            assert any(zz == z and abs(ss - s) <= 1e-6 * s for ss, zz in pairs), (name, s, z, sorted(pairs))


def test_dorefa_file_through_build_engine_asks_for_the_quantizer(tmp_path):
    torch.save({"conv1": {"weight_bits": 4}}, tmp_path / "calibration.pth")
    with pytest.raises(dc.EngineError, match="pass quantizer='dorefa' or quantizer='bnn'"):
        dc.build_engine(_net(), None, tmp_path / "calibration.pth", example_inputs=X[:1], out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_nni2_quantization_and_pruning_keys():
    model = _net()
    # qat_quantizer.py's schema: quant_dtype/quant_scheme per kind, quant_start_step per dict
    qat_cfg = [{"op_types": ["Conv2d"], "quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8},
                "quant_dtype": {"input": "int", "weight": "int"}, "quant_scheme": "per_channel_symmetric",
                "quant_start_step": 7}]
    q = dc.QATQuantizer(copy.deepcopy(model), qat_cfg)
    assert q.quant_start_step == 7 and q.module_configs["conv1"].granularity == "per_channel"
    fresh = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="one start step holds for the whole model"):
        dc.QATQuantizer(fresh, [{**qat_cfg[0], "op_names": ["conv1"]}, {**qat_cfg[0], "op_names": ["conv2"], "quant_start_step": 3}])
    assert type(fresh.conv1) is nn.Conv2d  # refused before the model is touched for good
    with pytest.raises(ConfigError, match="PTQQuantizer has no start step"):
        dc.PTQQuantizer(copy.deepcopy(model), qat_cfg)
    with pytest.raises(ConfigError, match="quant_dtype differs between kinds"):
        validate_config_list([{**qat_cfg[0], "quant_dtype": {"input": "uint", "weight": "int"}}])
    # basic_pruner.py's schema: max_sparsity_per_layer as {module_name: cap} next to total_sparsity
    cfg = [{"op_types": ["Conv2d"], "total_sparsity": 0.5, "max_sparsity_per_layer": {"conv1": 0.25}}]
    got = select_modules(model, cfg, kind="pruning")
    assert got["conv1"].max_sparsity_per_layer == 0.25 and got["conv2"].max_sparsity_per_layer is None
    with pytest.raises(ConfigError, match=r"max_sparsity_per_layer names \['fc'\]"):
        select_modules(model, [{**cfg[0], "max_sparsity_per_layer": {"fc": 0.3}}], kind="pruning")
    # a 3.0 dict's target_settings override its own shortcut keys (ModuleSetting.get)
    both = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "target_settings": {"weight": {"sparse_ratio": 0.25}}}]
    assert select_modules(model, both, kind="pruning")["conv1"].sparsity == 0.25


def test_automatic_pruners_read_nni3_config_lists():
    from deploycompress.pruning.search import selected_layers

    cfg = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.8, "global_group_id": 0,
            "exclude_op_names": ["conv2"]}]
    assert selected_layers(_net(), cfg, "l1") == {"conv1": 8}

"""The numpy calibrators: streaming behaviour, edge cases, and agreement with onnxruntime's calibrators."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import HistogramCollector, MinMaxCalibrater
from onnxruntime.quantization.quant_utils import compute_scale_zp

from calibrators import (
    EntropyCalibrator,
    MinMaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    QuantError,
    StreamingHistogram,
    create_calibrator,
    dequantize,
    params_from_range,
    params_from_scale,
    quantize,
)


@pytest.fixture(scope="module")
def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((8, 4, 6, 6)) * (1 + i)).astype(np.float32) for i in range(4)]


def _ort_histogram_range(method: str, x: np.ndarray, symmetric: bool, **kwargs) -> tuple[float, float]:
    opts = dict(num_bins=2048, num_quantized_bins=128, percentile=99.99, scenario="same")
    opts.update(kwargs)
    collector = HistogramCollector(method=method, symmetric=symmetric, **opts)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        collector.collect({"t": [x]})
        lo, hi = collector.compute_collection_result()["t"][:2]
    return float(lo), float(hi)


# -- MinMax ------------------------------------------------------------------------------------


def _identity_model(path, shape) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


class _Reader:
    def __init__(self, arrays):
        self.it = iter([{"x": a} for a in arrays])

    def get_next(self):
        return next(self.it, None)


@pytest.mark.parametrize("moving_average", [False, True])
def test_minmax_identical_to_onnxruntime(tmp_path, batches, moving_average):
    model = _identity_model(tmp_path / "m.onnx", batches[0].shape)
    ort = MinMaxCalibrater(model, augmented_model_path=str(tmp_path / "aug.onnx"), moving_average=moving_average)
    ort.augment_graph()
    ort.create_inference_session()
    ours = MinMaxCalibrator(moving_average=moving_average, symmetric=False)
    for b in batches:  # one collect per batch: onnxruntime's moving average steps once per collect_data
        ort.collect_data(_Reader([b]))
        ours.observe(b)
    lo, hi = ort.compute_data()["x"].range_value
    p = ours.compute()
    assert p.min[0] == lo and p.max[0] == hi
    zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.int32(0), np.int32(255), symmetric=False)
    u8 = p.with_flavour(symmetric=False, signed=False)
    assert u8.scale[0] == scale and u8.zero_point[0] == zp
    zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.int32(-127), np.int32(127), symmetric=True)
    assert p.with_flavour(symmetric=True, signed=True).scale[0] == scale and zp == 0


def test_minmax_per_channel_axis_and_streaming(batches):
    cal = MinMaxCalibrator(axis=1)
    for b in batches:
        cal.observe(b)
    p = cal.compute()
    stacked = np.concatenate(batches)
    assert p.axis == 1 and p.scale.shape == (4,)
    np.testing.assert_array_equal(p.min, stacked.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(p.max, stacked.max(axis=(0, 2, 3)))
    amax = np.maximum(-stacked.min(axis=(0, 2, 3)), stacked.max(axis=(0, 2, 3)))
    np.testing.assert_array_equal(p.scale, (amax.astype(np.float64) / 127).astype(np.float32))
    with pytest.raises(QuantError, match="axis 1 has 3 channels, earlier batches had 4"):
        cal.observe(np.zeros((2, 3, 6, 6), np.float32))
    neg = MinMaxCalibrator(axis=-3)
    neg.observe(batches[0])
    assert neg.compute().axis == 1


# -- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_constant_empty_and_nonfinite(method, caplog):
    cal = create_calibrator(method, name="conv1.output")
    with pytest.raises(QuantError, match="conv1.output: no values were observed"):
        cal.compute()
    cal.observe(np.zeros((0, 3), np.float32))  # empty: skipped
    cal.observe(np.full((4, 4), 0.5, np.float32))
    p = cal.compute()
    assert p.max[0] == pytest.approx(0.5, rel=1e-3) and p.min[0] in (0.0, 0.5)  # range widened to 0 later
    assert p.scale[0] == pytest.approx(0.5 / 127, rel=1e-3)
    zeros = create_calibrator(method)
    zeros.observe(np.zeros(10, np.float32))
    assert zeros.compute().scale[0] == 1.0  # all-zero tensor: scale 1, zero point 0
    with pytest.raises(QuantError, match=r"conv1.output: batch 1 holds 2 NaN/inf value\(s\)"):
        cal.observe(np.array([1.0, np.nan, np.inf], np.float32))
    lenient = create_calibrator(method, nonfinite="ignore", name="fc.input")
    with caplog.at_level(logging.WARNING):
        lenient.observe(np.array([-1.0, np.nan, 2.0, np.inf], np.float32))
    assert "fc.input: ignoring NaN/inf" in caplog.text and lenient.num_nonfinite == 2
    assert lenient.compute().max[0] <= 2.0
    only_nan = create_calibrator(method, nonfinite="ignore", name="x")
    only_nan.observe(np.array([np.nan], np.float32))
    with pytest.raises(QuantError, match=r"no values were observed \(1 NaN/inf values were ignored\)"):
        only_nan.compute()


def test_bad_options_are_named():
    with pytest.raises(QuantError, match="bits must be an integer from 2 to 16, got 17"):
        MinMaxCalibrator(bits=17)
    with pytest.raises(QuantError, match="unknown calibrator 'kl'"):
        create_calibrator("kl")
    with pytest.raises(QuantError, match=r"PercentileCalibrator has no option\(s\) \['num_quantized_bins'\]"):
        create_calibrator("percentile", num_quantized_bins=128)
    with pytest.raises(QuantError, match="percentile must lie in"):
        PercentileCalibrator(percentile=0)
    with pytest.raises(QuantError, match="num_bins must be a multiple of 4"):
        EntropyCalibrator(num_bins=1001)
    with pytest.raises(QuantError, match="cannot calibrate an array of dtype"):
        MinMaxCalibrator().observe(np.array(["a"]))


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("signed,symmetric", [(True, True), (False, False), (True, False)])
def test_bits_and_flavours_cover_the_range(bits, signed, symmetric, batches):
    cal = MinMaxCalibrator(bits=bits, signed=signed, symmetric=symmetric)
    for b in batches:
        cal.observe(b)
    p = cal.compute()
    x = np.concatenate([b.ravel() for b in batches])
    q = quantize(x, p)
    assert q.min() >= p.qmin and q.max() <= p.qmax
    # nothing is clipped by more than half a step: min/max were observed
    assert np.abs(dequantize(q, p) - x).max() <= p.scale[0] * 0.5 * (1 + 1e-3)  # float32 at 16 bits


# -- histograms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_up,merged", [(1.5, False), (3.5, True), (1000.0, True)])
def test_histogram_growth_is_exact_and_bounded(scale_up, merged):
    rng = np.random.default_rng(1)
    small = rng.uniform(-1, 1, 1000).astype(np.float32)
    big = rng.uniform(-scale_up, scale_up, 1000).astype(np.float32)
    h = StreamingHistogram(1, 64)
    for x in (small, big):
        h.add(x[None], np.array([x.min()]), np.array([x.max()]), None)
    assert h.threshold[0] >= np.abs(big).max() and h.size[0] <= 128 and h.size[0] % 4 == 0
    assert (h.width[0] > 2 * np.abs(small).max() / 64 * 1.01) == merged  # appended bins keep the width
    edges = h.edges(0)
    assert edges[h.size[0] // 2] == pytest.approx(0.0, abs=1e-9)  # 0 stays on a bin edge
    both = np.concatenate([small, big])
    recount, _ = np.histogram(both, bins=edges)
    # counts equal counting both batches in the final bins (up to values that sit on a bin edge)
    assert np.abs(h.row(0) - recount).sum() <= 4 and h.row(0).sum() == 2000


def test_histogram_starting_from_all_zeros():
    cal = PercentileCalibrator(percentile=100.0, symmetric=False)
    cal.observe(np.zeros(50, np.float32))
    cal.observe(np.array([2.0, -1.0], np.float32))
    p = cal.compute()
    assert (p.min[0], p.max[0]) == (-1.0, 2.0)
    assert cal.histogram.counts.sum() == 52


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_within_one_bin_of_onnxruntime(symmetric):
    rng = np.random.default_rng(2)
    for x in (rng.standard_normal(200_000), np.maximum(rng.standard_normal(200_000), 0), rng.standard_t(3, 200_000)):
        x = x.astype(np.float32)
        lo, hi = _ort_histogram_range("percentile", x, symmetric)
        cal = PercentileCalibrator(percentile=99.99, symmetric=symmetric)
        cal.observe(x)
        p = cal.compute()
        bin_width = 2 * np.abs(x).max() / 2048  # ours; onnxruntime's bins are at most this wide
        assert abs(p.max[0] - hi) <= 1.01 * bin_width
        assert abs(p.min[0] - lo) <= 1.01 * bin_width


def test_entropy_close_to_onnxruntime_on_centred_data():
    """On zero-centred data the two entropy variants pick thresholds within 20 % (the KL curve is flat
    near its minimum) whose int8 quantization errors are within 5 %; see BENCHMARKS.md for ReLU data."""
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal(300_000), rng.standard_t(3, 300_000), rng.laplace(size=300_000)):
        x = x.astype(np.float32)
        lo, hi = _ort_histogram_range("entropy", x, False)
        cal = EntropyCalibrator()
        cal.observe(x)
        p = cal.compute()
        assert p.max[0] == pytest.approx(max(-lo, hi), rel=0.2)
        assert p.max[0] < 0.99 * np.abs(x).max()  # it clips the tail
        theirs = params_from_range(lo, hi)
        err = lambda q: float(np.mean((dequantize(quantize(x, q), q) - x) ** 2))  # noqa: E731
        assert err(p) == pytest.approx(err(theirs), rel=0.05)


def test_entropy_ignores_the_relu_spike_at_zero():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(300_000).astype(np.float32)
    relu = np.concatenate([np.abs(x), np.zeros(300_000, np.float32)])
    a, b = EntropyCalibrator(), EntropyCalibrator()
    a.observe(np.abs(x))
    b.observe(relu)
    assert b.compute().max[0] == pytest.approx(a.compute().max[0], rel=0.01)
    assert b.compute().min[0] == 0.0


#: counts of a ReLU6 output's positive values in 24 bins over [0, 6] (MobileNetV2 features.1, random weights,
#: BatchNorm re-estimated, 64 photo crops): a long tail, and the clamped values piled up in the last bin
_RELU6_HIST = (2612490, 1920967, 3104502, 2353971, 757364, 723659, 521722, 390122, 175622, 92576, 67798, 45867,
               31783, 24478, 20053, 14317, 10867, 8255, 6863, 4889, 3688, 2846, 2332, 9663)


def test_entropy_keeps_the_full_range_of_a_clamped_tensor():
    """KL divergence compares shapes only: it clips the clamped values at the bound 6 (they move to the
    threshold at no cost in KL, but each loses bound - threshold); the saturation rule keeps 6."""
    rng = np.random.default_rng(7)
    counts = np.array(_RELU6_HIST) // 64
    parts = [rng.uniform(i * 0.25, (i + 1) * 0.25, c) for i, c in enumerate(counts[:-1])]
    clamped = int(0.7 * counts[-1])
    parts += [np.full(clamped, 6.0), rng.uniform(5.75, 6.0, counts[-1] - clamped), np.zeros(counts.sum())]
    x = np.concatenate(parts).astype(np.float32)
    sat, plain = EntropyCalibrator(), EntropyCalibrator(saturation_ratio=None)
    sat.observe(x)
    plain.observe(x)
    assert sat.compute().max[0] == pytest.approx(6.0, rel=1e-4)
    assert plain.compute().max[0] < 5.9
    # an unclamped tensor is not affected: its largest bin holds one value
    y = np.abs(rng.standard_normal(400_000)).astype(np.float32)
    a, b = EntropyCalibrator(), EntropyCalibrator(saturation_ratio=None)
    a.observe(y)
    b.observe(y)
    assert a.compute().max[0] == b.compute().max[0] < 0.99 * y.max()
    with pytest.raises(QuantError, match="saturation_ratio"):
        EntropyCalibrator(saturation_ratio=0.5)


def test_mse_clips_heavy_tails_and_beats_minmax():
    rng = np.random.default_rng(5)
    x = rng.laplace(size=100_000).astype(np.float32)
    mse, mm = MSECalibrator(bits=4), MinMaxCalibrator(bits=4)
    mse.observe(x)
    mm.observe(x)
    pm, pp = mse.compute(), mm.compute()
    err = lambda p: float(np.mean((dequantize(quantize(x, p), p) - x) ** 2))  # noqa: E731
    assert pm.max[0] < 0.5 * pp.max[0]
    assert err(pm) < 0.5 * err(pp)


def test_per_channel_histogram_calibrators():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 1000)).astype(np.float32) * np.array([[0.1], [1.0], [10.0]], np.float32)
    for method in ("percentile", "entropy", "mse"):
        cal = create_calibrator(method, axis=0)
        cal.observe(w)
        p = cal.compute()
        assert p.scale.shape == (3,) and p.axis == 0
        ratio = p.scale[1:] / p.scale[:-1]
        np.testing.assert_allclose(ratio, 10.0, rtol=0.35)


# -- params ----------------------------------------------------------------------------------------


def test_quantize_is_round_half_to_even_with_saturation():
    p = params_from_scale(0.5, 0, bits=8, signed=True)
    x = np.array([0.25, 0.75, -0.25, -0.75, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(quantize(x, p), [0, 2, 0, -2, 127, -128])
    u = params_from_range(-1.0, 3.0, bits=8, signed=False, symmetric=False)
    assert u.zero_point[0] == 64 and u.scale[0] == np.float32(4 / 255)
    np.testing.assert_array_equal(dequantize(quantize(np.array([0.0], np.float32), u), u), [0.0])


def test_params_from_scale_round_trips_through_params_from_range():
    for signed, zp in ((True, 0), (False, 0), (False, 128)):
        p = params_from_scale(np.array([0.1, 0.2]), zp, bits=8, signed=signed, axis=0)
        again = params_from_range(p.min, p.max, bits=8, signed=signed, symmetric=p.symmetric, axis=0)
        np.testing.assert_array_equal(again.scale, p.scale)
        np.testing.assert_array_equal(again.zero_point, p.zero_point)
    with pytest.raises(QuantError, match="scale must be positive"):
        params_from_scale(0.0)
    with pytest.raises(QuantError, match=r"zero_point must lie in \[-128, 127\]"):
        params_from_scale(1.0, 200)

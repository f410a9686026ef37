"""Calibration throughput and chosen ranges: deploycompress's calibrators vs onnxruntime's, one run.

    .venv/bin/python tools/bench_calibrators.py [--batches 8] [--shape 16,64,28,28]

For each distribution both sides see the same float32 batches. onnxruntime's MinMax runs through
its real MinMaxCalibrater (an identity ONNX model with ReduceMin/ReduceMax added); Percentile and
Entropy through its HistogramCollector (the part of HistogramCalibrater that does the work).
Reported: values/s for observing, seconds to compute the range, the ranges, and the int8 mean
squared error each range gives on the data (ratio ours / theirs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxruntime.quantization.calibrate import HistogramCollector, MinMaxCalibrater

from calibrators import EntropyCalibrator, MinMaxCalibrator, PercentileCalibrator, dequantize, params_from_range, quantize

DISTRIBUTIONS = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "relu(normal)": lambda rng, shape: np.maximum(rng.standard_normal(shape), 0),
    "student-t(3)": lambda rng, shape: rng.standard_t(3, shape),
    "laplace": lambda rng, shape: rng.laplace(size=shape),
}


def _mse(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    p = params_from_range(lo, hi, symmetric=symmetric, signed=symmetric)
    return float(np.mean((dequantize(quantize(x, p), p) - x) ** 2))


def _ort_minmax(batches: list[np.ndarray], tmp: Path) -> tuple[float, float, float]:
    shape = list(batches[0].shape)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp / "m.onnx")
    cal = MinMaxCalibrater(str(tmp / "m.onnx"), augmented_model_path=str(tmp / "aug.onnx"))
    cal.augment_graph()
    cal.create_inference_session()
    reader = iter([{"x": b} for b in batches])

    class Reader:
        def get_next(self):
            return next(reader, None)

    t = time.perf_counter()
    cal.collect_data(Reader())
    lo, hi = cal.compute_data()["x"].range_value
    return float(np.ravel(lo)[0]), float(np.ravel(hi)[0]), time.perf_counter() - t


def _ort_histogram(method: str, batches: list[np.ndarray], symmetric: bool, **opts) -> tuple[float, float, float, float]:
    collector = HistogramCollector(method=method, symmetric=symmetric, scenario="same", **opts)
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        for b in batches:
            collector.collect({"x": [b]})
        t_obs = time.perf_counter() - t
        t = time.perf_counter()
        lo, hi = (np.ravel(v)[0] for v in collector.compute_collection_result()["x"][:2])
        t_cmp = time.perf_counter() - t
    return float(lo), float(hi), t_obs, t_cmp


def _ours(cal, batches: list[np.ndarray]) -> tuple[float, float, float, float]:
    t = time.perf_counter()
    for b in batches:
        cal.observe(b)
    t_obs = time.perf_counter() - t
    t = time.perf_counter()
    p = cal.compute()
    t_cmp = time.perf_counter() - t
    return float(p.min[0]), float(p.max[0]), t_obs, t_cmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--shape", default="16,64,28,28")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    n_values = args.batches * int(np.prod(shape))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {args.batches} batches of {shape} float32 per tensor")
    print("| data | method | ours obs. Mval/s | ort obs. Mval/s | ours compute s | ort compute s | ours range | ort range | int8 MSE ours/ort |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dname, make in DISTRIBUTIONS.items():
        rng = np.random.default_rng(args.seed)
        batches = [make(rng, shape).astype(np.float32) for _ in range(args.batches)]
        x = np.concatenate([b.ravel() for b in batches])
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            lo, hi, t = _ort_minmax(batches, Path(tmp))
        olo, ohi, to, tc = _ours(MinMaxCalibrator(symmetric=False), batches)
        assert (olo, ohi) == (lo, hi), "MinMax must be identical"
        rows.append(("minmax (asym.)", (olo, ohi, to, tc), (lo, hi, t, 0.0), False))
        ort = _ort_histogram("percentile", batches, True, num_bins=2048, num_quantized_bins=128, percentile=99.99)
        ours = _ours(PercentileCalibrator(percentile=99.99), batches)
        rows.append(("percentile 99.99 (sym.)", ours, ort, True))
        ort = _ort_histogram("entropy", batches, False, num_bins=2048, num_quantized_bins=128, percentile=99.99)
        ours = _ours(EntropyCalibrator(), batches)
        rows.append(("entropy (KL)", ours, ort, True))
        for method, (a_lo, a_hi, a_obs, a_cmp), (b_lo, b_hi, b_obs, b_cmp), sym in rows:
            ratio = _mse(x, a_lo, a_hi, sym) / _mse(x, b_lo, b_hi, sym)
            b_obs_s = f"{n_values / b_obs / 1e6:.0f}" + (" (incl. compute)" if method.startswith("minmax") else "")
            print(
                f"| {dname} | {method} | {n_values / a_obs / 1e6:.0f} | {b_obs_s} | {a_cmp:.3f} | "
                f"{b_cmp:.3f} | [{a_lo:.3f}, {a_hi:.3f}] | [{b_lo:.3f}, {b_hi:.3f}] | {ratio:.3f} |"
            )


if __name__ == "__main__":
    main()

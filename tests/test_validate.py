"""Latency statistics, accuracy against the reference, user metrics, Polygraphy cross-backend comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from deploycompress.backends import get_backend
from deploycompress.validate import (
    LatencyStats,
    compare_backends,
    compare_outputs,
    measure_latency,
    validate,
)
from test_qdq import write_digits_graphs


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validate")
    model, x = write_digits_graphs(tmp, 64, {nn.Conv2d: ("input", "weight"), nn.Linear: ("input", "weight")})
    backend = get_backend("onnxruntime")
    fp32 = backend.load(backend.build(tmp / "fp32.onnx", tmp / "fp32", precision="fp32"), threads=1)
    fp32_plain = backend.load(tmp / "fp32" / "model.onnx", optimization_level="disable", threads=1)
    int8 = backend.load(backend.build(tmp / "int8.onnx", tmp / "int8", precision="int8"), threads=1)
    return model, x, fp32, fp32_plain, int8


def test_latency_stats_from_known_times():
    s = LatencyStats.from_times(4, [1.0, 2.0, 3.0, 4.0, 10.0])
    assert (s.mean_ms, s.p50_ms, s.min_ms, s.max_ms, s.iterations) == (4.0, 3.0, 1.0, 10.0, 5)
    assert s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert s.throughput == pytest.approx(4 * 1000 / 4.0)
    assert json.loads(json.dumps(s.to_dict()))["p99_ms"] == pytest.approx(s.p99_ms)


def test_measure_latency_per_batch_size_iterations_and_duration(runners):
    _, x, fp32, _, _ = runners
    stats = measure_latency(fp32, x.numpy()[:3], batch_sizes=(1, 8), warmup=2, iterations=7)
    assert [s.batch_size for s in stats] == [1, 8] and all(s.iterations == 7 for s in stats)
    assert all(0 < s.min_ms <= s.p50_ms <= s.p99_ms <= s.max_ms for s in stats)
    timed = measure_latency(fp32, x.numpy(), batch_sizes=(2,), warmup=0, duration_s=0.05)[0]
    assert timed.iterations >= 1 and timed.mean_ms * timed.iterations >= 0.9 * 50 - timed.max_ms
    with pytest.raises(ValueError, match="batch sizes"):
        measure_latency(fp32, x.numpy(), batch_sizes=(0,))


def test_compare_outputs_by_hand():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    out = np.array([[1.0, 0.5, 0.0], [0.0, 2.0, 3.0]])
    s = compare_outputs(out, ref)
    assert s.max_abs_error == 3.0 and s.mean_abs_error == pytest.approx(3.5 / 6)
    assert s.cosine_similarity == pytest.approx((1 / np.sqrt(1.25) + 4 / (2 * np.sqrt(13))) / 2)
    assert s.top1_agreement == 0.5
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(out[:1], ref)


def test_validate_fp32_matches_reference_and_scores_metric(runners):
    model, x, fp32, _, _ = runners
    labels = model(x).argmax(1).numpy()
    labels[:16] = (labels[:16] + 1) % 10  # a quarter of the labels wrong on purpose
    res = validate(fp32, model, x, labels=labels, batch_sizes=(1, 4), warmup=1, iterations=3)
    assert res.accuracy.max_abs_error < 1e-4 and res.accuracy.top1_agreement == 1.0
    assert res.metric.value == pytest.approx(0.75) and res.metric.delta == pytest.approx(0.0)
    assert [s.batch_size for s in res.latency] == [1, 4]
    json.dumps(res.to_dict())
    # a user metric on labelled data: mean probability of the true class
    def true_class_prob(logits, y):
        p = np.exp(logits - logits.max(1, keepdims=True))
        return float((p / p.sum(1, keepdims=True))[np.arange(len(y)), y].mean())

    res = validate(fp32, model, x, labels=labels, metric=true_class_prob, batch_sizes=())
    assert res.metric.name == "true_class_prob" and 0 < res.metric.value < 1 and res.latency == []


def test_validate_int8_reports_its_error(runners):
    model, x, _, _, int8 = runners
    res = validate(int8, model, x, batch_sizes=())
    assert 0 < res.accuracy.max_abs_error < 0.5 and res.accuracy.cosine_similarity > 0.99
    with pytest.raises(ValueError, match="needs labels"):
        validate(int8, model, x, metric=lambda o, y: 0.0, batch_sizes=())


def test_polygraphy_comparator_across_runners(runners):
    _, x, fp32, fp32_plain, int8 = runners
    feeds = [{"x": x[i : i + 16].numpy()} for i in range(0, 64, 16)]
    same = compare_backends({"ort-optimized": fp32, "ort-unoptimized": fp32_plain}, feeds, atol=1e-4, rtol=1e-4)
    assert same.passed and max(same.max_abs_error.values()) < 1e-4
    quantized = compare_backends({"fp32": fp32, "int8": int8}, feeds, atol=1e-5, rtol=1e-5)
    assert not quantized.passed and max(quantized.max_abs_error.values()) > 1e-5

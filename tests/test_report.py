"""report.json schema, the self-contained report.html (rendered in headless Chromium), the terminal summary."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from deploycompress.backends.base import LayerTime
from deploycompress.report import (
    AccuracyRecord,
    FidelityRecord,
    LatencyRecord,
    Report,
    ReportError,
    SizeRecord,
    performance_summary,
    render_html,
    report_summary,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import screenshot_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> Report:
    rng = np.random.default_rng(0)
    r = Report(name="digits <net>", backend="onnxruntime", precision="int8")
    r.latency = [
        LatencyRecord.from_samples("onnxruntime", "fp32", 1, rng.gamma(5.0, 0.02, 300)),
        LatencyRecord.from_samples("onnxruntime", "int8", 1, rng.gamma(5.0, 0.012, 300)),
        LatencyRecord.from_samples("onnxruntime", "int8", 8, rng.gamma(5.0, 0.05, 300)),
    ]
    r.set_layers([LayerTime(f"/conv{i}/Conv", "Conv", 0.001 * i, calls=10) for i in range(80)])
    r.sizes = [SizeRecord("original", 61_000, 2_100_000, 250_000), SizeRecord("deployed", 16_000, 600_000, 30_000)]
    r.accuracy = [AccuracyRecord("onnxruntime int8", "top1", 0.9711, "pytorch fp32", 0.9756)]
    r.fidelity = [FidelityRecord("onnxruntime int8", "pytorch fake-quant", 0.031, 0.99991, 0.9978)]
    r.steps = {"export": 0.5, "build": 0.2}
    return r


def test_latency_record_statistics():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    rec = LatencyRecord.from_samples("onnxruntime", "fp32", 4, samples)
    assert rec.mean_ms == pytest.approx(50.5)
    assert rec.p50_ms == pytest.approx(50.5) and rec.p99_ms == pytest.approx(np.percentile(samples, 99))
    assert (rec.min_ms, rec.max_ms, rec.iterations) == (1.0, 100.0, 100)
    assert rec.throughput == pytest.approx(4 * 1000 / 50.5)
    big = LatencyRecord.from_samples("onnxruntime", "fp32", 1, np.ones(10_000))
    assert len(big.samples_ms) == 2000 and big.iterations == 10_000
    with pytest.raises(ReportError, match="no samples"):
        LatencyRecord.from_samples("onnxruntime", "fp32", 1, [])


def test_report_json_round_trip_and_versioning(report, tmp_path):
    json_path, html_path = report.save(tmp_path)
    assert json_path.name == "report.json" and html_path.name == "report.html"
    assert Report.load(tmp_path) == report
    assert len(report.layers) == 50 and report.layers[0].name == "/conv79/Conv"  # slowest first, top 50 kept
    data = json.loads(json_path.read_text())
    data["version"] = 99
    with pytest.raises(ReportError, match="report version 99 is not supported"):
        Report.from_dict(data)
    data["version"] = 1
    data["latncy"] = []
    with pytest.raises(ReportError, match=r"unknown field\(s\) \['latncy'\]"):
        Report.from_dict(data)


def test_html_is_self_contained_with_four_plots(report):
    page = render_html(report)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not fetch anything"
    assert "digits &lt;net&gt;" in page and "<net>" not in page
    plots = dict(re.findall(r'id="plot-(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', page))
    assert sorted(plots) == ["accuracy", "latency", "layers", "sizes"]
    for data in plots.values():
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000


def test_terminal_summary_in_trtexec_style(report):
    text = performance_summary(report.latency[:1])
    r = report.latency[0]
    assert f"Throughput: {r.throughput:.2f} samples/s" in text
    assert f"median = {r.p50_ms:.4f} ms" in text and f"percentile(99%) = {r.p99_ms:.4f} ms" in text
    full = report_summary(report)
    assert "top1 = 97.11% (-0.45 pt vs pytorch fp32 97.56%)" in full
    assert "original: params = 61,000" in full


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from matplotlib.image import imread

    _, html_path = report.save(tmp_path)
    shot = screenshot_report.screenshot(html_path, tmp_path / "shot.png", width=1000, height=3200)
    pixels = (imread(shot)[..., :3] * 255).round().astype(int)
    # the latency boxes are filled with #4C72B0 at alpha 0.7 over white, the layer bars with solid #4C72B0
    bar_blue = np.all(np.abs(pixels - np.array([0x4C, 0x72, 0xB0])) <= 2, axis=-1)
    assert bar_blue.sum() > 5_000, "the per-layer bar plot did not render"
    green_or_red = np.all(np.abs(pixels - np.array([0xC4, 0x4E, 0x52])) <= 2, axis=-1)
    assert green_or_red.sum() > 200, "the accuracy delta plot did not render"
    extracted = screenshot_report.extract_plot(html_path, "latency", tmp_path / "latency.png")
    assert extracted.read_bytes().startswith(PNG_MAGIC)

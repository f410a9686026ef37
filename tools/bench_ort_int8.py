"""onnxruntime int8: our QDQ graph vs onnxruntime's own ``quantize_static``, against fp32.

For each model: fp32 ONNX (``to_onnx``); ours = PTQQuantizer calibration -> ``insert_qdq(target=
"onnxruntime")``; onnxruntime's ``quantize_static`` (QDQ format, per-channel weights, MinMax, after
its recommended ``quant_pre_process``) with S8S8, U8S8 and U8S8 + ``reduce_range``. Every variant
sees the same calibration batches. Latencies are measured round-robin (each round runs every
variant in turn) so that load from other processes hits all variants alike; the table gives
median latency and the ratio to fp32. Accuracy: top-1 on the digits test set; for the torchvision
models (random weights, no data set) top-1 agreement and cosine similarity with fp32 on held-out
random inputs. ``--graphs`` prints which ops onnxruntime ran after fusion, to explain differences.

    .venv/bin/python tools/bench_ort_int8.py --out runs/bench_ort_int8.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from deploycompress.export import insert_qdq, needs_reduced_range, to_onnx
from deploycompress.quantization import PTQQuantizer
from deploycompress.validate import compare_outputs
from deploycompress.zoo import DigitsNet, load_digits_data, train

log = logging.getLogger("bench_ort_int8")

CONFIG_LIST = [
    {"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8},
    {"op_types": ["BatchNorm2d", "ReLU", "ReLU6", "MaxPool2d", "AdaptiveAvgPool2d"], "quant_types": ["output"], "quant_bits": 8},
]
FLAVOURS = {  # name -> (activation type, weight type, reduce_range)
    "qs S8S8": ("QInt8", "QInt8", False),
    "qs U8S8": ("QUInt8", "QInt8", False),
    "qs U8S8 rr": ("QUInt8", "QInt8", True),
}


def _models(names: list[str], calib_batches: int, calib_bs: int):
    """(name, model, calibration batches, evaluation inputs, labels or None)."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    for name in names:
        if name == "digits":
            data = load_digits_data()
            model = train(DigitsNet(), data, epochs=8, batch_size=128, lr=5e-3).eval()
            yield name, model, list(data.batches(128))[:calib_batches * 2], data.test_x, data.test_y.numpy(), (1, 1, 8, 8)
            continue
        model = getattr(torchvision.models, name)(weights=None).eval()
        calib = [torch.randn(calib_bs, 3, 224, 224, generator=g) for _ in range(calib_batches)]
        evaluation = torch.randn(16, 3, 224, 224, generator=g)
        yield name, model, calib, evaluation, None, (1, 3, 224, 224)


def _ours(model: nn.Module, batches, example, tmp: Path) -> tuple[Path, Path]:
    fp32 = to_onnx(model, example)
    fp32_path = tmp / "fp32.onnx"
    onnx.save(fp32.model, fp32_path)
    quantizer = PTQQuantizer(model, CONFIG_LIST)
    quantizer.calibrate(batches)
    calib = quantizer.export_calib_config()
    quantizer.unwrap_model()
    ours_path = tmp / "ours.onnx"
    onnx.save(insert_qdq(fp32.model, calib, fp32.name_map, target="onnxruntime"), ours_path)
    return fp32_path, ours_path


def _quantize_static(fp32_path: Path, batches, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre))
    import onnx

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name  # forward's argument name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {input_name: b.numpy()}

    out = {}
    for name, (act, weight, rr) in FLAVOURS.items():
        path = tmp / f"{name.replace(' ', '_')}.onnx"
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=rr,
                        activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, weight))
        out[name] = path
    return out


def _session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _op_histogram(path: Path, tmp: Path) -> dict[str, int]:
    """The ops onnxruntime runs after its QDQ fusions (extended level, before CPU layout transforms)."""
    opt = tmp / f"opt_{path.name}"
    _session(path, 1, opt)
    counts = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    keep = ("Conv", "QLinearConv", "Gemm", "QGemm", "MatMul", "QLinearMatMul", "Add", "QLinearAdd", "QuantizeLinear",
            "DequantizeLinear", "Relu", "Clip", "QLinearGlobalAveragePool", "GlobalAveragePool", "MaxPool")
    return {k: counts[k] for k in keep if counts.get(k)}


def _time_round_robin(sessions: dict[str, ort.InferenceSession], feed: dict, budget_s: float) -> dict[str, list[float]]:
    """Per graph, the times (ms) of its steady-state runs, taken in rounds over all graphs (load drift is shared).

    A graph's first run after another graph's pays for refilling the caches (measured: 0.3-0.4 ms of
    EfficientNet-Lite0's 2.3 ms int8 run after the 18 MB dense fp32 graph), and in a fixed order that cost
    falls on whichever graph follows the largest one. So each turn starts with one untimed run, and the
    order goes through the permutations of the graphs round by round.
    """
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feed)
    t0 = time.perf_counter()
    sessions["fp32"].run(None, feed)
    one = max(time.perf_counter() - t0, 1e-4)
    rounds = int(np.clip(budget_s / (one * len(sessions) * 3), 5, 50))
    orders = list(itertools.permutations(sessions))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            s = sessions[name]
            s.run(None, feed)  # untimed: refills the caches after the previous graph
            for _ in range(2):
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append((time.perf_counter() - t) * 1e3)
    return times


def _evaluate(sessions, x: np.ndarray, labels) -> dict[str, dict]:
    outs = {k: np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i : i + 64]})[0] for i in range(0, len(x), 64)]) for k, s in sessions.items()}
    res = {}
    for k, out in outs.items():
        stats = compare_outputs(out, outs["fp32"])
        entry = {"agreement_fp32": stats.top1_agreement, "cosine_fp32": stats.cosine_similarity}
        if labels is not None:
            entry["accuracy"] = float((out.argmax(1) == labels).mean())
        res[k] = entry
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,digits")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model and batch size")
    ap.add_argument("--graphs", action="store_true", help="print the op histogram after onnxruntime's fusions")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    machine = {
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if flags else platform.processor(),
        "cores": os.cpu_count(),
        "vnni": bool({"avx512_vnni", "avx_vnni"} & set(flags)),
        "ours_reduce_range": needs_reduced_range(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    print(json.dumps(machine))
    results = []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for name, model, calib, x_eval, labels, shape in _models(args.models.split(","), args.calib_batches, args.calib_batch_size):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmpdir:
            tmp = Path(tmpdir)
            fp32_path, ours_path = _ours(model, calib, torch.zeros(shape), tmp)
            paths = {"fp32": fp32_path, "ours": ours_path, **_quantize_static(fp32_path, calib, tmp)}
            sessions = {k: _session(p, args.threads) for k, p in paths.items()}
            acc = _evaluate(sessions, x_eval.numpy(), labels)
            graphs = {k: _op_histogram(p, tmp) for k, p in paths.items()} if args.graphs else {}
            for bs in batch_sizes:
                feed = {sessions["fp32"].get_inputs()[0].name: np.ascontiguousarray(np.resize(x_eval.numpy(), (bs, *shape[1:])).astype(np.float32))}
                times = _time_round_robin(sessions, feed, args.budget)
                med = {k: float(np.median(v)) for k, v in times.items()}
                row = {"model": name, "batch": bs, "median_ms": med, "ratio_fp32": {k: med[k] / med["fp32"] for k in med},
                       "runs": {k: len(v) for k, v in times.items()}, "accuracy": acc}
                results.append(row)
                print(f"{name} b{bs}: " + ", ".join(f"{k} {med[k]:.2f} ms ({med[k] / med['fp32']:.2f}x)" for k in med), flush=True)
            print(f"{name} accuracy: {json.dumps(acc)}")
            for k, h in graphs.items():
                print(f"{name} {k} ops after fusion: {h}")
            if graphs:
                results[-1]["graphs"] = graphs
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    _print_table(results)


def _print_table(results: list[dict]) -> None:
    variants = list(results[0]["median_ms"]) if results else []
    print("\n| model | batch | " + " | ".join(f"{v} ms (x fp32)" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for r in results:
        cells = [f"{r['median_ms'][v]:.2f} ({r['ratio_fp32'][v]:.2f}x)" for v in variants]
        print(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    print("\n| model | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    seen = set()
    for r in results:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        acc = r["accuracy"]
        if "accuracy" in acc["fp32"]:
            cells = [f"{acc[v]['accuracy'] * 100:.2f}%" for v in variants]
        else:
            cells = [f"agree {acc[v]['agreement_fp32'] * 100:.0f}%, cos {acc[v]['cosine_fp32']:.4f}" for v in variants]
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""EfficientNet-Lite0 (pretrained, ImageNet) int8 on onnxruntime: deploycompress vs its two peers, on real photos.

All 49 convolutions of EfficientNet-Lite0 are ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that
pads in forward). Photos: scikit-image's and scikit-learn's eight colour sample photos, cut into 15 deterministic crops
each (a fixed grid of positions and scales) and their mirror images, ImageNet preprocessing (224x224,
mean/std); the 240 crops alternate between the calibration half (120: each crop) and the evaluation
half (120: each mirror image).

Variants, all from the same fp32 ONNX graph and the same calibration crops:

* ``ours <calibrator>``: ``build_engine(calib_data=..., calibrator=..., strict=True)`` (default quantization
  config: inputs and weights of every Conv/Linear, outputs of the BatchNorms/ReLU6/pools; fails if any
  selected layer is not int8 in onnxruntime's optimized graph), one row per ``--calibrators`` entry, and with
  ``--bias-correction`` a second row each with ``bias_correction=True`` (empirical bias correction on the
  calibration crops, Nagel et al. 2019);
* ``ort qs``: onnxruntime's ``quantize_static`` after its ``quant_pre_process``, QDQ, U8S8, MinMax, per-channel
  weights (and ``ort qs pt``: its default per-tensor weights);
* ``modelopt``: NVIDIA ModelOpt ONNX PTQ (``python -m modelopt.onnx.quantization --quantize_mode int8
  --calibration_method max --high_precision_dtype fp32``), run with the interpreter given by
  ``--modelopt-python`` (its install pins onnx/onnxruntime-gpu versions that conflict with the project's,
  so it lives in its own venv).

Reported per variant: top-1 agreement with the PyTorch fp32 model on the evaluation crops (and, with
``--extra-crops N``, on N more seeded random crops per photo and their mirrors: a larger evaluation), median batch-1
latency (onnxruntime CPU, ``--threads`` intra-op threads, round-robin so other load hits all variants
alike) and its ratio to fp32 onnxruntime, and the integer kernels in onnxruntime's optimized graph.

    python -m venv /tmp/mo-venv && /tmp/mo-venv/bin/pip install "nvidia-modelopt[onnx]"
    PYTHONPATH=. python tools/bench_efficientnet_lite0.py --modelopt-python /tmp/mo-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ort_int8 import _session, _time_round_robin  # noqa: E402

from deploycompress.zoo import crops, photos  # noqa: E402
from deploycompress.zoo import load_efficientnet_lite0 as load_model  # noqa: E402

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger")
FLOAT_WEIGHTED = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm")


def ours(model, calib: torch.Tensor, example: torch.Tensor, tmp: Path, calibrator: str, bias_correction: bool = False) -> tuple[Path, Path, dict]:
    from deploycompress import build_engine

    art = build_engine(model, example_inputs=example, out_dir=tmp / f"ours_{calibrator}_{int(bias_correction)}", calib_data=list(calib.split(8)),
                       calibrator=calibrator, eval_inputs=example, iterations=2, warmup=1, compare_fp32=False, progress=False,
                       strict=True, bias_correction=bias_correction)
    return art.out_dir / "source" / "model.fp32.onnx", art.out_dir / "source" / "model.qdq.onnx", art.report.quantized_layers


def quantize_static(fp32: Path, calib: torch.Tensor, tmp: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as qs
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib.split(4))

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {input_name(fp32): b.numpy()}

    out = tmp / f"qs_{'pc' if per_channel else 'pt'}.onnx"
    qs(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
       activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def extra_crops(images: dict, per_photo: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """A larger evaluation: ``per_photo`` seeded random crops of every photo (side 35-95 % of the short side, any
    position) and their mirror images, preprocessed as :func:`deploycompress.zoo.crops`."""
    import torch.nn.functional as F

    from deploycompress.zoo.photos import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for im in images.values():
        t = torch.from_numpy(np.array(im[..., :3])).permute(2, 0, 1).float()[None] / 255
        h, w = t.shape[-2:]
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.35, 0.95))
            y, x = int((h - side) * rng.uniform()), int((w - side) * rng.uniform())
            c = F.interpolate(t[..., y : y + side, x : x + side], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out += [(c - mean) / std, (c.flip(-1) - mean) / std]
    return torch.cat(out)


def agreement(session, x: torch.Tensor, reference: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 8].numpy()})[0] for i in range(0, len(x), 8)])
    return float((logits.argmax(1) == reference).mean())


def input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def modelopt(python: str, fp32: Path, calib: torch.Tensor, tmp: Path) -> Path:
    data = tmp / "calib.npy"
    np.save(data, calib.numpy())
    out = tmp / "modelopt.onnx"
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32), "--quantize_mode", "int8",
           "--calibration_data_path", str(data), "--calibration_method", "max", "--output_path", str(out),
           "--high_precision_dtype", "fp32", "--calibration_eps", "cpu"]
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"modelopt failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return out


def kernels(path: Path, tmp: Path) -> dict[str, int]:
    """Integer and float weighted kernels in onnxruntime's optimized graph (extended level)."""
    opt = tmp / f"opt_{path.name}"
    _session(path, 1, opt)
    counts = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    # Pad/Add left in the optimized graph run in float (onnxruntime's integer forms: QLinearAdd; a
    # zero Pad folded into QLinearConv)
    return {"int8": sum(counts[k] for k in INTEGER_OPS), "float": sum(counts[k] for k in FLOAT_WEIGHTED),
            **{k: counts[k] for k in INTEGER_OPS + FLOAT_WEIGHTED + ("QLinearAdd", "Add", "Pad") if counts.get(k)}}


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(info.split())
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
            "onnxruntime": ort.__version__, "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-python", default=None, help="python of a venv with nvidia-modelopt[onnx] (skipped if absent)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibrators", default="percentile,minmax", help="activation calibrators of our builds, one row each")
    ap.add_argument("--bias-correction", action="store_true", help="also one row per calibrator with build_engine(bias_correction=True)")
    ap.add_argument("--extra-crops", type=int, default=0, help="a larger evaluation: this many seeded random crops per photo (and mirrors)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of round-robin timing (0: agreement only)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    machine = cpu()
    print(json.dumps(machine), flush=True)
    model = load_model()
    x = crops(photos())
    calib, evaluation = x[0::2], x[1::2]
    print(f"{len(x)} crops: {len(calib)} calibration, {len(evaluation)} evaluation", flush=True)
    with torch.no_grad():
        reference = model(evaluation).argmax(1).numpy()
    extra = extra_crops(photos(), args.extra_crops) if args.extra_crops else None
    if extra is not None:
        with torch.no_grad():
            extra_reference = torch.cat([model(b) for b in extra.split(32)]).argmax(1).numpy()
        print(f"larger evaluation: {len(extra)} more crops ({args.extra_crops} random crops per photo and their mirrors)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-efflite0-") as tmpdir:
        tmp = Path(tmpdir)
        paths: dict[str, Path] = {}
        for calibrator in args.calibrators.split(","):
            for bc in (False, True) if args.bias_correction else (False,):
                label = f"ours {calibrator}" + (" +bias corr." if bc else "")
                fp32, paths[label], audit = ours(model, calib, evaluation[:1], tmp, calibrator, bc)
                print(f"{label}: {audit['requested']} weighted layers selected, {audit['in_qdq']} int8 in the QDQ graph, "
                      f"{audit['in_optimized']} int8 in onnxruntime's optimized graph", flush=True)
        paths = {"fp32": fp32, **paths, "ort qs": quantize_static(fp32, calib, tmp, True),
                 "ort qs pt": quantize_static(fp32, calib, tmp, False)}
        if args.modelopt_python:
            try:
                paths["modelopt"] = modelopt(args.modelopt_python, fp32, calib, tmp)
            except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, the rest still measured
                print(f"modelopt skipped: {exc}", flush=True)
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        rows = {}
        for name, s in sessions.items():
            rows[name] = {"agreement": agreement(s, evaluation, reference), "kernels": kernels(paths[name], tmp)}
            if extra is not None:
                rows[name]["agreement_extra"] = agreement(s, extra, extra_reference)
            print(f"{name}: agreement {rows[name]['agreement']:.4f}" + (f", larger evaluation {rows[name]['agreement_extra']:.4f}" if extra is not None else ""), flush=True)
        if args.budget > 0:
            feed = {input_name(fp32): evaluation[:1].numpy()}
            times = _time_round_robin(sessions, feed, args.budget)
            for name, t in times.items():
                rows[name].update(median_ms=float(np.median(t)), runs=len(t))
                rows[name]["ratio_fp32"] = rows[name]["median_ms"] / float(np.median(times["fp32"]))
    more = f" | on {len(extra)} more crops" if extra is not None else ""
    print(f"\n| variant | top-1 agreement with fp32 (issue's 120){more} | median ms (batch 1) | x fp32 | int8 / float weighted kernels |")
    print("|---|---|" + ("---|" if extra is not None else "") + "---|---|---|")
    for name, r in rows.items():
        k = r["kernels"]
        extra_cell = f" {r['agreement_extra']:.3f} ({round(r['agreement_extra'] * len(extra))}/{len(extra)}) |" if extra is not None else ""
        timing = f"{r['median_ms']:.2f} | {r['ratio_fp32']:.2f}x" if "median_ms" in r else "- | -"
        print(f"| {name} | {r['agreement']:.3f} ({round(r['agreement'] * len(evaluation))}/{len(evaluation)}) |{extra_cell} "
              f"{timing} | {k['int8']} / {k['float']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "audit": audit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

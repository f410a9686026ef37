"""TensorRT int8 graphs: our ``target="tensorrt"`` QDQ vs NVIDIA ModelOpt's ONNX PTQ, same models, same data.

For each model: one fp32 ONNX (``to_onnx``); ours = ``PTQQuantizer`` (the default config of
``build_engine``) + ``insert_qdq(target="tensorrt")``; ModelOpt = ``python -m modelopt.onnx.quantization
--quantize_mode int8 --calibration_method max|entropy --calibration_eps cpu --high_precision_dtype fp32``
on that fp32 ONNX with the same calibration array (ModelOpt runs from its own venv, ``--modelopt-python``,
since it pins its own torch). Both graphs run in onnxruntime (CPU) against the fp32 graph on held-out
inputs: top-1 agreement and cosine similarity; plus Q/DQ counts, our lint (``lint_qdq(..., "tensorrt")``)
and TensorRT pre-build check findings on both, and the placement TensorRT fuses: Adds with a dequantized
input (and whether it is the shortcut, i.e. not a weighted op's output), Concats whose inputs share one scale.

Data: no ImageNet here, so the inputs are real photographs: the eight colour photos scikit-image and
scikit-learn ship (:mod:`deploycompress.zoo.photos`), split into two disjoint halves of four photos;
calibration uses the ImageNet-style crops (and mirror images) of one half, evaluation those of the other,
so no evaluated photo was calibrated on. The torchvision models have random weights (no download here)
whose BatchNorm statistics are first re-estimated on random crops of scikit-learn's two photos (so
activations have realistic ranges); with random weights the logits are near-flat, so top-1 agreement is
noisy and the cosine is the steadier figure. ``vit_small`` is a ViT-S/16 in timm's layout (12 blocks, 6
heads, width 384, MLP 1536; qkv and proj as ``nn.Linear``, timm's initialization), written here since timm is
not a dependency. ``efficientnet_lite0`` is the ImageNet-pretrained EfficientNet-Lite0
(:func:`deploycompress.zoo.photos.load_efficientnet_lite0`, its BatchNorm statistics as trained): the one
model here with real weights, so its top-1 agreement means what it says.

    python tools/bench_qdq_vs_modelopt.py --modelopt-python /tmp/movenv/bin/python --models resnet18 mobilenet_v2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from deploycompress.engine import default_quant_config
from deploycompress.export import check_tensorrt, insert_qdq, lint_qdq, to_onnx
from deploycompress.quantization import PTQQuantizer

log = logging.getLogger("bench_qdq_vs_modelopt")
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
OUR_CALIBRATOR = {"max": "minmax", "entropy": "entropy"}


def crops(n: int, seed: int, size: int = 224) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    images = [np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = images[rng.integers(len(images))]
        side = int(rng.integers(size, min(im.shape[:2]) + 1))
        y, x = rng.integers(0, im.shape[0] - side + 1), rng.integers(0, im.shape[1] - side + 1)
        patch = torch.from_numpy(im[y:y + side, x:x + side].transpose(2, 0, 1).copy())[None]
        patch = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0].numpy()
        out[i] = patch[:, :, ::-1] if rng.random() < 0.5 else patch
    return (out - MEAN) / STD


class _Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class _Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = torch.nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, mlp), torch.nn.GELU(), torch.nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTSmall(torch.nn.Module):
    """ViT-S/16 (Dosovitskiy et al. 2021) in timm's ``vit_small_patch16_224`` layout: (N, 3, 224, 224) -> (N, 1000)."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, mlp: int = 1536, classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, dim, 16, 16)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 197, dim))
        self.blocks = torch.nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, classes)
        for p in (self.cls_token, self.pos_embed):
            torch.nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def photo_split(extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and evaluation inputs: crops of two disjoint halves of the shipped photos.

    Evaluation: the 120 grid crops of the evaluation half and, with ``extra``, that many more seeded random crops
    per evaluation photo and their mirror images (``bench_efficientnet_lite0.extra_crops``, seed 0)."""
    from bench_efficientnet_lite0 import extra_crops  # tools/ is on sys.path when this runs as a script

    from deploycompress.zoo.photos import crops as photo_crops, photos, split_photos

    calib, evaluation = split_photos(photos())
    evalx = photo_crops(evaluation).numpy()
    if extra:
        evalx = np.concatenate([evalx, extra_crops(evaluation, extra).numpy()])
    return photo_crops(calib).numpy(), evalx


def model_for(name: str, bn_data: np.ndarray) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    if name == "efficientnet_lite0":  # ImageNet-pretrained weights (the `evidence` extra): real logits
        from deploycompress.zoo.photos import load_efficientnet_lite0

        return load_efficientnet_lite0().eval()
    if name == "vit_small":
        model = ViTSmall()
    else:
        model = getattr(torchvision.models, name)(weights=None)
    model.train()
    with torch.no_grad():  # re-estimate BatchNorm statistics on image crops (cumulative average)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        for i in range(0, len(bn_data), 16):
            model(torch.from_numpy(bn_data[i:i + 16]))
    return model.eval()


def run(path: str | Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    s = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def fidelity(y: np.ndarray, ref: np.ndarray) -> dict:
    a, b = y.reshape(len(y), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "max_abs": float(np.abs(y - ref).max()), "agrees": (y.argmax(1) == ref.argmax(1))}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Crops where only one graph agrees with fp32 (the discordant pairs), and the two-sided sign-test p-value of
    that split (McNemar's exact test): a small p says the top-1 difference is more than evaluation noise."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return {"only_ours": only_a, "only_modelopt": only_b, "sign_test_p": round(float(p), 3)}


def placement(model: onnx.ModelProto) -> dict:
    """Adds/Concats as TensorRT fuses them: an Add with a dequantized input (shortcut = the DQ'd input is
    not produced, before its Q, by a weighted op); Concats whose inputs all carry one scale."""
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(model)
    weighted = {"Conv", "ConvTranspose", "Gemm", "MatMul"}

    def producer(t):
        return t.inputs[0] if t.inputs else None

    adds = [n for n in g.nodes if n.op == "Add" and not any(isinstance(i, gs.Constant) for i in n.inputs)]
    add_dq = add_shortcut = add_both = 0
    for n in adds:
        dq_inputs = [i for i in n.inputs if producer(i) is not None and producer(i).op == "DequantizeLinear"]
        add_dq += bool(dq_inputs)
        add_both += len(dq_inputs) == len(n.inputs)
        for i in dq_inputs:
            q = producer(producer(i).inputs[0])
            src = producer(q.inputs[0]) if q is not None and q.op == "QuantizeLinear" else None
            if src is None or src.op not in weighted:
                add_shortcut += 1
                break
    concats = [n for n in g.nodes if n.op == "Concat"]
    shared = 0
    for n in concats:
        scales = []
        for i in n.inputs:
            p = producer(i)
            if p is None or p.op != "DequantizeLinear":
                break
            scales.append(float(np.asarray(p.inputs[1].values).reshape(-1)[0]) if isinstance(p.inputs[1], gs.Constant) else None)
        else:
            shared += len(set(scales)) == 1
    return {"adds": len(adds), "adds_with_dq_input": add_dq, "adds_dq_on_shortcut": add_shortcut, "adds_all_inputs_dq": add_both,
            "concats": len(concats), "concats_shared_scale": shared}


def quantized_tensors(model: onnx.ModelProto) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray, int]]]:
    """Activation tensor -> its per-tensor scale; weight initializer -> (per-channel scales, int8 values, axis), read
    from either layout: ours (int8 initializer ``<w>_quantized`` -> DequantizeLinear) or ModelOpt's (float
    initializer -> QuantizeLinear -> DequantizeLinear, the int8 values computed here as QuantizeLinear does)."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    acts: dict[str, float] = {}
    weights: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for n in model.graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if n.op_type == "QuantizeLinear" and n.input[0] not in values:
            acts[n.input[0]] = float(values[n.input[1]].reshape(-1)[0])
        elif n.op_type == "QuantizeLinear":
            w, scale = values[n.input[0]], values[n.input[1]]
            shape = [1] * w.ndim
            shape[axis % w.ndim] = -1
            weights[n.input[0]] = (scale, np.clip(np.rint(w / scale.reshape(shape)), -128, 127).astype(np.int8), axis % w.ndim)
        elif n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and n.input[0] in values:
            weights[n.input[0][: -len("_quantized")]] = (values[n.input[1]], values[n.input[0]], axis % values[n.input[0]].ndim)
    return acts, weights


def diff_graphs(ours: Path, peer: Path) -> dict:
    """Tensor-by-tensor: activations quantized by one graph only, activation scales that differ (relative
    difference > 1e-5: a calibration difference, not float rounding), weight scales' largest relative difference
    (channels with a nonzero int8 weight) and the int8 weight values that differ."""
    (a_acts, a_w), (b_acts, b_w) = quantized_tensors(onnx.load(str(ours))), quantized_tensors(onnx.load(str(peer)))
    common = set(a_acts) & set(b_acts)
    ratio = {t: a_acts[t] / b_acts[t] for t in common}
    differ = {t: r for t, r in ratio.items() if abs(r - 1) > 1e-5}
    shared_w = [w for w in a_w if w in b_w and a_w[w][0].shape == b_w[w][0].shape]

    def rel_diff(w: str) -> float:  # an all-zero channel quantizes to 0 at any scale (ModelOpt writes 1, we a typical one)
        scale, q, axis = a_w[w]
        used = np.moveaxis(q != 0, axis, 0).reshape(scale.size, -1).any(1) if scale.size > 1 else np.ones(1, bool)
        r = np.abs(a_w[w][0].astype(np.float64) / b_w[w][0] - 1).reshape(-1)
        return float(r[used].max(initial=0.0))

    rel = max((rel_diff(w) for w in shared_w), default=0.0)
    return {"acts_only_ours": len(set(a_acts) - set(b_acts)), "acts_only_peer": len(set(b_acts) - set(a_acts)),
            "acts_scale_differs": len(differ), "acts_scale_ratio_range": [round(min(differ.values(), default=1.0), 3),
                                                                       round(max(differ.values(), default=1.0), 3)],
            "weights_only_ours": len(set(a_w) - set(b_w)), "weights_only_peer": len(set(b_w) - set(a_w)),
            "weight_scale_max_rel_diff": float(f"{rel:.2g}"),
            "weight_int8_values_differ": int(sum(int((a_w[w][1] != b_w[w][1]).sum()) for w in shared_w))}


def nudged(path: Path, seed: int) -> onnx.ModelProto:
    """The graph with every Q/DQ scale moved one float32 ulp up or down at random: how far results move when
    nothing but the last bit of the scales changes (the size of the two graphs' scale differences under max
    calibration, where both sides run the same rule)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    m = onnx.load(str(path))
    scales = {n.input[1] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for init in m.graph.initializer:
        if init.name in scales:
            a = numpy_helper.to_array(init)
            if a.dtype == np.float32:
                up = rng.random(a.shape) < 0.5
                init.CopyFrom(numpy_helper.from_array(np.nextafter(a, np.where(up, np.inf, -np.inf).astype(np.float32)), init.name))
    return m


def describe(path: Path) -> dict:
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    lint = lint_qdq(m, "tensorrt")
    trt = check_tensorrt(m, lint=False)
    return {"q": ops.count("QuantizeLinear"), "dq": ops.count("DequantizeLinear"),
            "lint_errors": sorted({f.rule for f in lint if f.severity == "error"}),
            "lint_error_count": sum(f.severity == "error" for f in lint),
            "lint_warnings": sum(f.severity == "warning" for f in lint),
            "trt_check_errors": sorted({f.rule for f in trt.errors}), **placement(m)}


def modelopt(python: str, fp32: Path, calib: Path, out: Path, method: str) -> float:
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32), "--quantize_mode", "int8",
           "--calibration_data_path", str(calib), "--calibration_method", method, "--calibration_eps", "cpu",
           "--high_precision_dtype", "fp32", "--output_path", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"ModelOpt failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def ours(model: torch.nn.Module, calib: np.ndarray, exported, out: Path, method: str) -> float:
    t0 = time.perf_counter()
    q = PTQQuantizer(copy.deepcopy(model), default_quant_config(model), calibrator=OUR_CALIBRATOR[method])
    q.calibrate([torch.from_numpy(calib[i:i + 16]) for i in range(0, len(calib), 16)])
    onnx.save(insert_qdq(exported.model, q.export_calib_config(), exported.name_map, target="tensorrt"), str(out))
    return time.perf_counter() - t0


def cpu_flags() -> dict:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "") if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": name or platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_at_start": os.getloadavg()[0],
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--methods", nargs="+", default=["max"], choices=["max", "entropy"])
    ap.add_argument("--calib", type=int, default=0, help="first N calibration crops (0: all)")
    ap.add_argument("--eval", type=int, default=0, help="first N evaluation crops (0: all)")
    ap.add_argument("--extra-crops", type=int, default=60,
                    help="seeded random crops per evaluation photo (and their mirrors) added to its 120 grid crops: "
                         "60 gives 600 evaluation inputs (one crop 0.0017 of top-1)")
    ap.add_argument("--ulp-spread", type=int, default=0,
                    help="also evaluate N copies of our graph with every scale nudged one ulp at random: the spread "
                         "that last-bit differences alone cause")
    ap.add_argument("--modelopt-python", default=os.environ.get("MODELOPT_PYTHON", "python"))
    ap.add_argument("--out", default="runs/bench_qdq_vs_modelopt.json")
    ap.add_argument("--modelopt-cache", default=None,
                    help="keep ModelOpt's graphs here, named by a hash of the fp32 graph, the calibration data and the "
                         "method, and reuse them on a rerun with identical inputs (ModelOpt takes minutes per model)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bn = crops(256, 1)
    calib, evalx = photo_split(args.extra_crops)
    calib, evalx = calib[:args.calib or None], evalx[:args.eval or None]
    log.info("calibration %s, evaluation %s (disjoint photos)", calib.shape, evalx.shape)
    results = {"machine": cpu_flags(), "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        np.save(d / "calib.npy", calib)
        for name in args.models:
            model = model_for(name, bn)
            exported = to_onnx(model, torch.from_numpy(calib[:1]))
            fp32 = d / f"{name}.fp32.onnx"
            exported.save(fp32)
            ref = run(fp32, evalx)
            key = hashlib.sha256(fp32.read_bytes() + calib.tobytes()).hexdigest()[:16]
            row: dict = {}
            agrees: dict[str, np.ndarray] = {}
            paths: dict[str, Path] = {}
            for method in args.methods:
                for who in ("ours", "modelopt"):
                    path = d / f"{name}.{who}.{method}.onnx"
                    cached = Path(args.modelopt_cache) / f"{name}.{method}.{key}.onnx" if args.modelopt_cache else None
                    if who == "ours":
                        secs = ours(model, calib, exported, path, method)
                    elif cached is not None and cached.is_file():
                        path, secs = cached, float("nan")
                        log.info("ModelOpt's graph from %s (same fp32 graph and calibration data)", cached)
                    else:
                        secs = modelopt(args.modelopt_python, fp32, d / "calib.npy", path, method)
                        if cached is not None:
                            cached.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copyfile(path, cached)
                    paths[who] = path
                    row[f"{who} {method}"] = {**fidelity(run(path, evalx), ref), **describe(path), "quantize_s": round(secs, 1)}
                    agrees[who] = row[f"{who} {method}"].pop("agrees")
                    log.info("%s %s %s: %s", name, who, method, json.dumps(row[f"{who} {method}"]))
                row[f"ours {method}"]["top1_discordant"] = paired(agrees["ours"], agrees["modelopt"])
                if args.ulp_spread:
                    spread = [fidelity(run(nudged(paths["ours"], k), evalx), ref) for k in range(args.ulp_spread)]
                    row[f"ours {method}"]["ulp_spread"] = {
                        key: [min(f[key] for f in spread), max(f[key] for f in spread)] for key in ("top1_agreement", "cosine_mean")}
                row[f"ours {method}"]["vs_modelopt"] = diff_graphs(d / f"{name}.ours.{method}.onnx", paths["modelopt"])
                log.info("%s %s ours vs ModelOpt, tensor by tensor: %s", name, method, json.dumps(row[f"ours {method}"]["vs_modelopt"]))
            results["models"][name] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nmachine: {results['machine']}")
    print("| model | graph | top-1 agr. | only this graph agrees (sign-test p) | cosine mean (min) | Q/DQ | lint errors | TRT check errors | "
          "Add with DQ (shortcut) / Adds | Concat shared / Concats |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results["models"].items():
        for k, r in row.items():
            who, method = k.split()
            d = row[f"ours {method}"]["top1_discordant"]
            only = f"{d['only_ours']} ({d['sign_test_p']})" if who == "ours" else f"{d['only_modelopt']}"
            print(f"| {name} | {k} | {r['top1_agreement']:.3f} | {only} | {r['cosine_mean']:.5f} ({r['cosine_min']:.4f}) | {r['q']}/{r['dq']} | "
                  f"{r['lint_error_count']} {r['lint_errors'] or ''} | {len(r['trt_check_errors'])} | "
                  f"{r['adds_with_dq_input']} ({r['adds_dq_on_shortcut']}) / {r['adds']} | {r['concats_shared_scale']} / {r['concats']} |")

    print("\n| model | method | activations quantized only by ours / only by ModelOpt | activation scales differing (ours / ModelOpt) | "
          "weight scales: largest relative difference | int8 weight values differing | ours, scales nudged 1 ulp: top-1, cosine range |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results["models"].items():
        for k, r in row.items():
            if "vs_modelopt" in r:
                v = r["vs_modelopt"]
                lo, hi = v["acts_scale_ratio_range"]
                u = r.get("ulp_spread")
                spread = (f"{u['top1_agreement'][0]:.3f}-{u['top1_agreement'][1]:.3f}, {u['cosine_mean'][0]:.5f}-{u['cosine_mean'][1]:.5f}"
                          if u else "-")
                print(f"| {name} | {k.split()[1]} | {v['acts_only_ours']} / {v['acts_only_peer']} | {v['acts_scale_differs']}"
                      f"{f' ({lo}-{hi})' if v['acts_scale_differs'] else ''} | {v['weight_scale_max_rel_diff']:.1e} | "
                      f"{v['weight_int8_values_differ']} | {spread} |")


if __name__ == "__main__":
    main()

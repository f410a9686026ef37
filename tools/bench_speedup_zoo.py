"""Speedup across torchvision's classification zoo, against Torch-Pruning in the same run.

Per model (each in its own process, with a time and memory limit): L1NormPruner at the given
sparsity on Conv2d and hidden Linear layers (the classifier excluded, dependency-aware), then
speedup; the equivalence error against the masked model, params and FLOPs ratios, seconds; and
Torch-Pruning's MetaPruner (L1 magnitude, same ratio, same excluded classifier) on a fresh copy.
Errors are measured in this tool against the user's masked model (each mask multiplied into exactly
the tensor it names), in two mask styles: the dependency-aware pruner's and independent masks (every
layer masked on its own, what NNI users bring). ``--sweep`` does the same with random masks, cheaply.

    nice -n 10 .venv/bin/python tools/bench_speedup_zoo.py --shard 0/2 --out runs/speedup_zoo_s0 &
    nice -n 10 .venv/bin/python tools/bench_speedup_zoo.py --shard 1/2 --out runs/speedup_zoo_s1 &
    .venv/bin/python tools/bench_speedup_zoo.py --merge runs/speedup_zoo_s0 runs/speedup_zoo_s1 --out runs/speedup_zoo
    .venv/bin/python tools/bench_speedup_zoo.py --ort-latency resnet50 --size 224 --out runs/speedup_zoo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_speedup_zoo")
NUM_CLASSES = 1000


def _build(name: str, size: int) -> tuple[Any, Any]:
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=False)
    model = torchvision.models.get_model(name, **kwargs).eval()
    with torch.no_grad():  # zero-initialised heads (ViT) give all-zero outputs, which would hide any error
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not bool(m.weight.any()):
                torch.nn.init.normal_(m.weight, std=0.02)
    if name.startswith("vit_") or name.startswith("maxvit"):
        size = 224  # their position embeddings / window partitions are built for 224x224
    if name == "inception_v3":
        size = max(size, 96)  # its stem needs at least 75x75
    return model, torch.randn(1, 3, size, size)


def _classifier(model: Any) -> list[str]:
    from torch import nn

    # the 1000-way head: a Linear, or a 1x1 Conv2d where the model has no such Linear (squeezenet)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    return linear or [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES]


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _user_rel_error(model: Any, masks: dict, small: Any, x: Any) -> float:
    """max |shrunk - reference| / max |reference|, the reference built here: an eval copy of ``model``
    with each mask multiplied into exactly the tensor it names (the user's masked model)."""
    import copy

    import torch

    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, per in masks.items():
            for attr, mask in per.items():
                t = getattr(modules[name], attr)
                t.mul_(mask.to(t.device, t.dtype))
        expected, actual = ref(x), small(x)
    return float((expected - actual).abs().max()) / max(float(expected.abs().max()), 1e-12)


def _independent_masks(model: Any, ratio: float, seed: int = 0) -> dict:
    """What NNI users bring: every Conv2d/Linear (classifier excluded) masked on its own, random output
    channels (weight rows and bias), nothing dependency-aware and nothing joined."""
    from deploycompress.pruning import random_layer_masks

    return random_layer_masks(model, ratio, seed, exclude=_classifier(model))


def _ours(name: str, size: int, sparsity: float, round_to: int, norm_spans: str = "keep") -> tuple[dict[str, Any], Any, Any, Any]:
    import torch

    from deploycompress.counting import count_flops_params
    from deploycompress.pruning import L1NormPruner
    from deploycompress.speedup import speedup_with_report

    model, x = _build(name, size)
    dense_flops = count_flops_params(model, x).flops
    # Linear also selects MultiheadAttention.out_proj; MultiheadAttention: rows of its packed q/k/v projection (whole heads)
    config_list = [{"op_types": ["Conv2d", "Linear", "MultiheadAttention"], "sparsity": sparsity}]
    if _classifier(model):
        config_list.append({"exclude": True, "op_names": _classifier(model)})
    start = time.perf_counter()
    pruner = L1NormPruner(model, config_list, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()
    prune_s = time.perf_counter() - start
    import copy

    model_before = copy.deepcopy(model)  # speedup runs in place below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        small, report = speedup_with_report(model, masks, x, round_to=round_to, norm_spans=norm_spans, inplace=True)
        speedup_s = time.perf_counter() - start
    with torch.no_grad():
        small_flops = count_flops_params(small, x).flops
    row = {
        "user_rel_error": _user_rel_error(model_before, masks, small, x),
        "rel_error": report.relative_error,
        "max_abs_error": report.max_abs_error,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_ratio": report.params_ratio,
        "flops_ratio": small_flops / max(dense_flops, 1),
        "prune_s": prune_s,
        "speedup_s": speedup_s,
        "kept_masked": sum(r.kept_masked for r in report.layers),
        "masked": sum(r.masked_out for r in report.layers),
        "norm_spans": norm_spans,
        "norms_changed": len(report.norms_changed),  # narrowed norms: the error is expected, not a failure
    }
    row.update(_independent_row(_build(name, size)[0], x, sparsity, round_to, norm_spans))  # a fresh dense model
    return row, small, x, masks


def _independent_row(model: Any, x: Any, sparsity: float, round_to: int, norm_spans: str) -> dict[str, Any]:
    """The same model with independent masks (every layer on its own): speedup's error against the user's
    masked model and its params ratio."""
    from deploycompress.speedup import speedup_with_report

    masks = _independent_masks(model, sparsity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = speedup_with_report(model, masks, x, round_to=round_to, norm_spans=norm_spans)
    return {"indep_user_rel_error": _user_rel_error(model, masks, small, x), "indep_params_ratio": report.params_ratio}


def _torch_pruning(name: str, size: int, sparsity: float) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    model, x = _build(name, size)
    before = _params(model)
    modules = dict(model.named_modules())
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity,
        ignored_layers=[modules[n] for n in _classifier(model)],
    )  # fmt: skip
    pruner.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model(x)  # the pruned model must still run
    return {"tp_params_ratio": _params(model) / before, "tp_s": seconds}


def run_one(name: str, size: int, sparsity: float, round_to: int, norm_spans: str, result: Path, with_tp: bool) -> None:
    import torch

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}

    def flush() -> None:
        result.write_text(json.dumps(row))

    try:
        ours, *_ = _ours(name, size, sparsity, round_to, norm_spans)
        exact = max(ours["user_rel_error"], ours["indep_user_rel_error"]) <= 1e-4
        row.update(ours, ok=ours["rel_error"] is not None and (exact or ours["norms_changed"] > 0))
    except Exception as exc:  # noqa: BLE001 - a failure is a table row, not the end of the run
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    flush()
    if with_tp:
        try:
            row.update(_torch_pruning(name, size, sparsity))
        except Exception as exc:  # noqa: BLE001
            row.update(tp_error=f"{type(exc).__name__}: {str(exc)[:200]}")
        flush()


def _limit_memory(gib: float) -> None:
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torchvision
    from tqdm import tqdm

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        names = names[k::n]
    if args.reverse:
        names = names[::-1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tqdm(names, desc="models"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = Path(f.name)
        cmd = [sys.executable, __file__, "--one", name, "--result", str(result), "--size", str(args.size),
               "--sparsity", str(args.sparsity), "--round-to", str(args.round_to), "--norm-spans", args.norm_spans,
               ] + (["--no-tp"] if args.no_tp else [])  # fmt: skip
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout,
                preexec_fn=lambda: _limit_memory(args.memory_gib),
            )  # fmt: skip
            status = None if proc.returncode == 0 else f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {args.timeout} s"
        row = json.loads(result.read_text()) if result.stat().st_size else {"model": name, "ok": False}
        result.unlink()
        if status:
            row.setdefault("error", status) if "rel_error" not in row else row.setdefault("tp_error", status)
            row["ok"] = bool(row.get("ok")) and "rel_error" in row
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        log.info("%s", row)
        _write(rows, out, args)
    return rows


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _kept_share(row: dict[str, Any]) -> float | None:
    """kept_masked_share: the masked output channels speedup had to keep (zeroed), as a share."""
    return row["kept_masked"] / max(row["masked"], 1) if "masked" in row else None


def _write(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    os.replace(tmp, out / "results.json")
    lines = [
        "| model | ok | rel. error vs the user's masked model | params ratio | FLOPs ratio | kept masked | speedup s "
        "| independent masks: rel. error vs the user's masked model | independent: params ratio | TP params ratio | TP s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        note = r.get("error") or (f"TP: {r['tp_error']}" if r.get("tp_error") else "")
        if r.get("norms_changed"):
            note = f"{r['norms_changed']} norms narrowed (norm_spans=prune) " + note
        lines.append(
            f"| {r['model']} | {'yes' if r.get('ok') else 'NO'} | {_fmt(r.get('user_rel_error', r.get('rel_error')), '.1e')} "
            f"| {_fmt(r.get('params_ratio'))} | {_fmt(r.get('flops_ratio'))} | {_fmt(_kept_share(r))} | {_fmt(r.get('speedup_s'), '.1f')} "
            f"| {_fmt(r.get('indep_user_rel_error'), '.1e')} | {_fmt(r.get('indep_params_ratio'))} "
            f"| {_fmt(r.get('tp_params_ratio'))} | {_fmt(r.get('tp_s'), '.1f')} | {note.replace('|', '/')[:120]} |"
        )
    tmp = out / "table.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "table.md")


def ort_latency(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """onnxruntime CPU latency of the dense and the speeded-up model, next to the FLOPs ratio."""
    import numpy as np
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    row, small, x, _ = _ours(name, args.size, args.sparsity, args.round_to, args.norm_spans)
    dense, _ = _build(name, args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sessions = {}
    for label, model in (("dense", dense), ("speedup", small)):
        path = out / f"{name}_{label}.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.ort_threads
        sessions[label] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(5):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(args.ort_runs):  # interleaved, so load from other processes hits both alike
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[label].append(time.perf_counter() - start)
    y_small = sessions["speedup"].run(None, feed)[0]
    with torch.no_grad():
        y_ref = small(x).numpy()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "model": name,
        "dense_ms": med["dense"],
        "speedup_ms": med["speedup"],
        "latency_ratio": med["speedup"] / med["dense"],
        "flops_ratio": row["flops_ratio"],
        "params_ratio": row["params_ratio"],
        "target_ms": med["dense"] * row["flops_ratio"],
        "off_target": med["speedup"] / (med["dense"] * row["flops_ratio"]) - 1,
        "ort_vs_torch_max_abs": float(np.abs(y_small - y_ref).max()),
        "runs": args.ort_runs,
        "threads": args.ort_threads,
        "round_to": args.round_to,
    }
    (out / f"ort_latency_{name}_r{args.round_to}.json").write_text(json.dumps(result, indent=1))
    return result


def sweep(args: argparse.Namespace) -> None:
    """Equivalence only, in one process, no Torch-Pruning, BatchNorm statistics randomised, in both mask
    styles: random whole channel classes per group (dependency-aware, joined parameters masked where the
    library does that) and independent masks (every layer on its own). Errors are measured here against
    the user's masked model (masks multiplied into exactly the named tensors)."""
    import torch
    import torchvision

    torch.set_num_threads(1)
    try:
        from deploycompress.pruning import random_group_masks
    except ImportError:  # the library before random masks moved out of graph (for before/after runs)
        from deploycompress.graph import random_group_masks
    from deploycompress.speedup import speedup_with_report

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        names = names[k::n]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        start = time.perf_counter()
        row: dict[str, Any] = {"model": name}
        try:
            model, x = _build(name, args.size)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                        m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
            styles = {"": lambda: random_group_masks(model, x, args.sparsity), "indep_": lambda: _independent_masks(model, args.sparsity)}
            for prefix, make in styles.items():
                masks = make()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small, report = speedup_with_report(model, masks, x)
                row |= {f"{prefix}user_rel_error": _user_rel_error(model, masks, small, x),
                        f"{prefix}rel_error": report.relative_error, f"{prefix}params_ratio": report.params_ratio,
                        f"{prefix}kept_masked": sum(r.kept_masked for r in report.layers),
                        f"{prefix}masked": sum(r.masked_out for r in report.layers)}  # fmt: skip
                del small
            row["ok"] = max(row["user_rel_error"], row["indep_user_rel_error"]) <= 1e-4
        except Exception as exc:  # noqa: BLE001
            row |= {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        log.info("%s", row)
        (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | ok | dependency-aware: rel. error vs the user's masked model | params ratio | independent: rel. error vs the user's masked model | params ratio | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {'yes' if r.get('ok') else 'NO'} | {_fmt(r.get('user_rel_error'), '.1e')} | {_fmt(r.get('params_ratio'))} "
                     f"| {_fmt(r.get('indep_user_rel_error'), '.1e')} | {_fmt(r.get('indep_params_ratio'))} | {r.get('error', '')[:100]} |")  # fmt: skip
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print(f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} models within 1e-4 of the user's masked model in both mask styles; {out}/sweep.md")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="default: every torchvision classification model")
    p.add_argument("--size", type=int, default=128, help="input side (ViT and MaxViT always get 224)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--norm-spans", choices=["keep", "prune"], default="keep",
                   help="speedup's norm_spans: 'prune' also removes widths a LayerNorm/GroupNorm spans (outputs then differ)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per model")
    p.add_argument("--memory-gib", type=float, default=10.0, help="address-space limit per model process")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--out", default="runs/speedup_zoo")
    p.add_argument("--shard", metavar="K/N", help="run every N-th model starting at K (parallel runs)")
    p.add_argument("--reverse", action="store_true", help="run the list from its end (a helper run beside the shards)")
    p.add_argument("--merge", nargs="*", metavar="DIR", help="merge the results.json of shard runs into --out (later wins)")
    p.add_argument("--sweep", action="store_true", help="equivalence only: random group masks, one process, no Torch-Pruning")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ort-latency", metavar="MODEL", help="measure onnxruntime CPU latency of MODEL dense vs speeded-up")
    p.add_argument("--ort-runs", type=int, default=30)
    p.add_argument("--ort-threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("deploycompress").setLevel(logging.WARNING)
    if args.one:
        run_one(args.one, args.size, args.sparsity, args.round_to, args.norm_spans, Path(args.result), not args.no_tp)
    elif args.sweep:
        sweep(args)
    elif args.merge:
        by_model: dict[str, dict[str, Any]] = {}
        for d in args.merge:  # a model run twice (shard and helper): keep the more complete row
            for r in json.loads((Path(d) / "results.json").read_text())["rows"]:
                old = by_model.get(r["model"])
                if old is None or len(r) >= len(old):
                    by_model[r["model"]] = r
        rows = list(by_model.values())
        order = {n: i for i, n in enumerate(__import__("torchvision").models.list_models(module=__import__("torchvision").models))}
        rows.sort(key=lambda r: order.get(r["model"], len(order)))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _write(rows, Path(args.out), args)
    elif args.ort_latency:
        print(json.dumps(ort_latency(args.ort_latency, args), indent=1))
    else:
        rows = run_all(args)
        ok = sum(bool(r.get("ok")) for r in rows)
        what = "equivalent within 1e-4" + (" or with narrowed norms" if args.norm_spans == "prune" else "")
        print(f"{ok}/{len(rows)} models {what}; table in {args.out}/table.md")


if __name__ == "__main__":
    main()

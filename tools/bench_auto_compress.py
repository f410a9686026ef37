"""Latency-budget vs FLOPs-budget search: NetAdapt and simulated annealing on resnet18 (32x32 inputs).

Each search prunes the first conv of every basic block (the convs speedup can shrink without a
dependency-aware pruner) with L1 filters, under a budget of ``--budget`` times the dense model's
latency (measured on onnxruntime CPU after speedup) or FLOPs. Every search gets the same fine-tuning
budget: ``--ft-steps`` steps of distillation towards the dense model's logits on random inputs per
candidate. The accuracy proxy is top-1 agreement with the dense model on held-out random inputs.
The final models are timed again interleaved with the dense model (more repeats); latency ratios
are those paired measurements. By default the FLOPs-budget run of each algorithm gets the FLOPs ratio
its latency-budget run reached (``--flops-budget match``), so each pair is compared at equal FLOPs.

    python tools/bench_auto_compress.py --budget 0.6
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import time
import warnings

import torch
from torch import nn


def _cpu() -> str:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name}; avx512_vnni {'yes' if 'avx512_vnni' in info else 'no'}; {torch.get_num_threads()} torch threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.6, help="target as a fraction of the dense model's resource")
    ap.add_argument("--algos", default="netadapt,sa")
    ap.add_argument("--ft-steps", type=int, default=3)
    ap.add_argument("--step", type=float, default=0.1, help="NetAdapt: resource step per round, as a fraction of the dense value")
    ap.add_argument("--cool-down", type=float, default=0.7, help="annealing: cool_down_rate (fewer candidates when lower)")
    ap.add_argument("--repeats", type=int, default=3, help="latency repeats per measurement inside the searches")
    ap.add_argument("--batch", type=int, default=1, help="batch size the latency is measured at")
    ap.add_argument("--metrics", default="latency,flops", help="budget kinds to run, of latency,flops")
    ap.add_argument("--flops-budget", default="match", help="FLOPs budget: 'match' (the FLOPs ratio the same algorithm's latency "
                                                             "run reached, so the pair is at equal FLOPs) or 'same' (--budget)")
    ap.add_argument("--verbose", action="store_true", help="log the searches' decisions (INFO)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        logging.getLogger("deploycompress.pruning").setLevel(logging.INFO)
    warnings.simplefilter("ignore")
    from torchvision.models import resnet18

    from deploycompress.counting import count_flops_params
    from deploycompress.pruning import NetAdaptPruner, ResourceMeter, SimulatedAnnealingPruner

    torch.manual_seed(0)
    dense = resnet18(num_classes=10).eval()
    example = torch.randn(args.batch, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    held_out = torch.randn(128, 3, 32, 32, generator=gen)
    train_x = torch.randn(512, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref_labels = dense(held_out).argmax(1)
        teacher = dense(train_x)

    def agreement(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(held_out).argmax(1) == ref_labels).float().mean())

    def distil(model: nn.Module) -> None:
        """Logit distillation on random inputs; BatchNorm statistics stay those of the dense model."""
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.eval()  # random inputs must not move the running statistics
        g = torch.Generator().manual_seed(2)
        for _ in range(args.ft_steps):
            idx = torch.randint(len(train_x), (32,), generator=g)
            loss = nn.functional.mse_loss(model(train_x[idx]), teacher[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    layers = [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    config = [{"op_names": layers}]
    final_meter = ResourceMeter("latency", example, repeats=9, iterations=30)
    rows = []
    dense_ms = final_meter(dense, None)
    dense_flops, dense_params, _ = count_flops_params(dense, example[:1])
    print(f"CPU: {_cpu()}")
    print(f"dense resnet18 32x32 batch {args.batch}: {dense_ms:.3f} ms, {dense_flops / 1e6:.1f} MFLOPs, {dense_params / 1e6:.2f} M params")
    for algo in args.algos.split(","):
        reached: float | None = None  # the FLOPs ratio the latency-budget run reached
        for metric in args.metrics.split(","):
            budget = args.budget
            if metric == "flops" and args.flops_budget == "match" and reached is not None:
                budget = reached
            meter = ResourceMeter(metric, example, repeats=args.repeats, iterations=10)
            t0 = time.perf_counter()
            if algo == "netadapt":
                pruner = NetAdaptPruner(dense, config, distil, agreement, resource=meter, budget=budget, dummy_input=example,
                                        sparsity_per_iteration=args.step, max_sparsity_per_layer=0.9)  # fmt: skip
            elif algo == "sa":
                pruner = SimulatedAnnealingPruner(dense, config, agreement, cool_down_rate=args.cool_down, pruning_algorithm="l1",
                                                  finetuner=distil, resource=meter, budget=budget, dummy_input=example,
                                                  max_sparsity_per_layer=0.9, seed=0)  # fmt: skip
            else:
                raise SystemExit(f"unknown algorithm {algo!r}")
            model, masks = pruner.compress()
            seconds = time.perf_counter() - t0
            plain = pruner.unwrap_model()
            small = meter.deployed(plain, masks)
            flops, params, _ = count_flops_params(small, example[:1])
            ratio = final_meter.relative(small, None, dense)  # timed interleaved with the dense model
            ms = ratio * dense_ms
            row = {
                "algorithm": algo, "budget": f"{metric} x{budget:.3g}", "latency_ms": round(ms, 3), "latency_ratio": round(ratio, 3),
                "mflops": round(flops / 1e6, 1), "flops_ratio": round(flops / dense_flops, 3), "mparams": round(params / 1e6, 2),
                "agreement": round(agreement(copy.deepcopy(model)), 3), "search_s": round(seconds, 1), "measurements": meter.measurements,
            }  # fmt: skip
            rows.append(row)
            if metric == "latency":
                reached = flops / dense_flops
            print(json.dumps(row))
    header = ["algorithm", "budget", "latency_ms", "latency_ratio", "mflops", "flops_ratio", "mparams", "agreement", "search_s", "measurements"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_ms": dense_ms, "dense_flops": dense_flops, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""Whole-head masks through speedup: half the heads of every attention module, by L1 norm of their v rows.

The zoo benchmark's L1 pruner masks q/k/v rows one by one, which removes no head; this measures what
speedup does with masks that follow the head classes (params ratio, equivalence error, seconds).

    PYTHONPATH=$PWD .venv/bin/python tools/bench_attention_heads.py vit_b_16 swin_t swin_v2_t
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from bench_speedup_zoo import _build

from deploycompress.graph.attention import attention_spec
from deploycompress.speedup import speedup_with_report


def head_masks(model: torch.nn.Module, ratio: float) -> dict[str, dict[str, torch.Tensor]]:
    """Masks on each packed q/k/v projection that zero the q, k and v rows of the weakest heads."""
    masks = {}
    for name, module in model.named_modules():
        spec = attention_spec(name, module)
        if spec is None:
            continue
        w = getattr(spec.qkv, spec.weight_attr).detach()
        heads = spec.num_heads
        score = w.view(3, heads, -1, w.shape[1])[2].abs().sum((1, 2))
        keep = torch.ones(3, heads, w.shape[0] // (3 * heads), dtype=torch.bool)
        keep[:, score.argsort()[: int(heads * ratio)]] = False
        keep = keep.reshape(-1)
        qkv_name = name if spec.kind == "mha" else f"{name}.qkv"
        masks[qkv_name] = {spec.weight_attr: keep.view(-1, 1).expand_as(w).clone(), spec.bias_attr: keep.clone()}
    return masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--ratio", type=float, default=0.5, help="share of heads masked in every attention module")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        model, x = _build(name, 224)
        masks = head_masks(model, args.ratio)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = speedup_with_report(model, masks, x)
        print(
            f"{name}: {len(masks)} attention modules, params ratio {report.params_ratio:.3f}, "
            f"rel. error {report.relative_error:.2e}, speedup {time.perf_counter() - start:.1f} s"
        )


if __name__ == "__main__":
    main()

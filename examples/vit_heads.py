"""Prune a Vision Transformer's attention heads and residual stream, shrink it, and run it on onnxruntime.

    python examples/vit_heads.py                      # a small ViT (32 px), seconds on a CPU
    python examples/vit_heads.py --torchvision vit_b_16 --size 224

Steps: dependency-aware L1 on every Conv2d, Linear and MultiheadAttention but the classifier (whole
heads go: a head's q, k and v rows are one channel class), speedup in the default mode (outputs equal
to the masked model) and with ``norm_spans="prune"`` (the LayerNorm-spanned stream goes too; its
statistics change, so fine-tune after), then ONNX export of the shrunk model checked in onnxruntime.
Random weights: the point is the shapes, the parameter counts and the equalities.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from torchvision.models import VisionTransformer

import deploycompress as dc


def build(name: str | None, size: int) -> VisionTransformer:
    if name:
        model = torchvision.models.get_model(name, image_size=size)
    else:
        model = VisionTransformer(image_size=size, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)  # torchvision zero-initialises it: every output would be 0
    return model.eval()


def heads(model: torch.nn.Module) -> list[int]:
    return [int(layer.self_attention.num_heads) for layer in model.encoder.layers]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torchvision", metavar="NAME", help="a torchvision ViT, e.g. vit_b_16 (default: a small one)")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # the reports below say what was kept and why

    torch.manual_seed(0)
    model, x = build(args.torchvision, args.size), torch.randn(1, 3, args.size, args.size)
    config_list = [
        {"op_types": ["Conv2d", "Linear", "MultiheadAttention"], "sparsity": args.sparsity},
        {"exclude": True, "op_names": ["heads.head"]},
    ]
    pruner = dc.L1NormPruner(model, config_list, dependency_aware=True, dummy_input=x)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()

    small, report = dc.speedup_with_report(model, masks, x)
    print(f"keep:  params {report.params_before:,} -> {report.params_after:,} ({report.params_ratio:.3f}), "
          f"heads {heads(model)} -> {heads(small)}, hidden_dim {small.hidden_dim}, "
          f"rel. error vs masked model {report.relative_error:.1e}")  # fmt: skip
    # the stream is pinned by the LayerNorms under "keep", so the pruner did not mask the class token and
    # position embedding with it: narrowing the norms also drops those entries (both trades measured)
    narrow, report = dc.speedup_with_report(model, masks, x, norm_spans="prune", masked_constants="prune")
    print(f"prune: params {report.params_before:,} -> {report.params_after:,} ({report.params_ratio:.3f}), "
          f"heads {heads(narrow)}, hidden_dim {narrow.hidden_dim}, {len(report.norms_changed)} LayerNorms narrowed "
          f"(rel. deviation {report.relative_error:.2f}: fine-tune to recover)")  # fmt: skip

    proto = dc.to_onnx(narrow, x).model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = narrow(x).numpy()
    print(f"onnxruntime vs PyTorch (pruned model): max |diff| {np.abs(got - ref).max():.2e}, max |output| {np.abs(ref).max():.2e}")


if __name__ == "__main__":
    main()

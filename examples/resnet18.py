"""torchvision resnet18 (random weights: no downloads) through the whole flow on onnxruntime CPU:

L1-norm prune 50% of the inner convolutions -> speedup (widths rounded to 8) -> PTQ on synthetic
images -> onnxruntime int8 next to fp32 -> bundle + report. Accuracy means nothing with random
weights and data; the report's latency, per-layer time and size do.

    python examples/resnet18.py --out runs/resnet18
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torchvision

import deploycompress as dc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/resnet18"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8, help="keep pruned widths a multiple of this")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    example = torch.randn(1, 3, args.image_size, args.image_size)
    # the first conv of each residual block: its output feeds only the block's second conv
    inner = [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    pruner = dc.L1NormPruner(model, [{"op_names": inner, "sparsity": args.sparsity}], dummy_input=example)
    _, masks = pruner.compress()
    model = pruner.unwrap_model()

    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 3, args.image_size, args.image_size, generator=gen) for _ in range(args.calib_batches)]
    artifact = dc.build_engine(
        model,
        masks,
        None,
        example_inputs=example,
        precision="int8",
        out_dir=args.out,
        calib_data=calib,
        eval_inputs=torch.randn(16, 3, args.image_size, args.image_size, generator=gen),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        iterations=args.iterations,
        round_to=args.round_to,
        name="resnet18",
        overwrite=True,
    )
    print(dc.report_summary(artifact.report))
    print(f"\nreport: {artifact.report_html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job, end to end on real data (scikit-learn's load_digits), on onnxruntime CPU:

train -> L1-norm prune 50% -> fine-tune -> speedup -> PTQ -> onnxruntime int8 -> bundle + report.

    python examples/digits_end_to_end.py --out runs/digits
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import deploycompress as dc
from deploycompress.zoo import DigitsNet, accuracy, load_digits_data, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="bundle directory (an earlier bundle there is replaced)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calibrator", default="minmax", choices=["minmax", "percentile", "entropy", "mse"])
    parser.add_argument("--iterations", type=int, default=200, help="timed runs per batch size")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "manifest.json").is_file():
        parser.error(f"--out {args.out} is a non-empty directory that is not a bundle; choose another")
    start = time.perf_counter()

    data = load_digits_data()
    torch.manual_seed(0)
    model = train(DigitsNet(width=args.width), data, epochs=args.epochs)
    fp32_acc = accuracy(model, data.test_x, data.test_y)
    print(f"[1/4] trained DigitsNet(width={args.width}) on {len(data.train_x)} images: test accuracy {100 * fp32_acc:.2f}%")

    config_list = [{"op_types": ["Conv2d"], "sparsity": args.sparsity}, {"exclude": True, "op_names": ["conv1"]}]
    # dummy_input: the masks then cover what speedup removes with the channels (BatchNorm affine, biases)
    pruner = dc.L1NormPruner(model, config_list, dummy_input=data.test_x[:1])
    _, masks = pruner.compress()
    masked_acc = accuracy(model, data.test_x, data.test_y)
    train(model, data, epochs=args.finetune_epochs, lr=1e-3)  # masks stay applied while fine-tuning
    model = pruner.unwrap_model()
    tuned_acc = accuracy(model, data.test_x, data.test_y)
    print(f"[2/4] pruned conv2/conv3 by {args.sparsity:.0%} (L1 norm): {100 * masked_acc:.2f}% -> fine-tuned {100 * tuned_acc:.2f}%")

    print("[3/4] speedup -> PTQ calibration -> ONNX + QDQ -> onnxruntime int8 -> validate -> bundle")
    artifact = dc.build_engine(
        model,
        masks,
        None,
        example_inputs=data.test_x[:1],
        backend="onnxruntime",
        precision="int8",
        out_dir=args.out,
        calib_data=list(data.batches(64)),
        calibrator=args.calibrator,
        eval_inputs=data.test_x,
        eval_labels=data.test_y,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        iterations=args.iterations,
        name="digits",
        overwrite=True,
    )
    print(f"[4/4] done in {time.perf_counter() - start:.1f} s\n")
    print(dc.report_summary(artifact.report))
    print(f"\nbundle:  {artifact.out_dir}")
    print(f"Triton:  {artifact.out_dir / 'model_repository'}")
    print(f"report:  {artifact.report_html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

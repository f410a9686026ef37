"""Choose the distillation recipe of ``examples/efficientnet_lite0.py`` on the calibration half only.

The example calibrates/recovers on one half of the photos (:func:`deploycompress.zoo.split_photos`) and evaluates on
the other. To pick hyperparameters without looking at the evaluation half, this tool splits the *calibration* half
again the same way: the pruned model is pruned, refitted and distilled exactly as the example does (its ``prune`` and
``refit``, its defaults unless ``--example-args`` says otherwise) on the inner training photos (plus the unlabelled
extra photos), and scored against the dense fp32 model on the inner validation photos: their deterministic crops and
mirrors plus ``--val-views`` seeded random views. The evaluation half is never loaded.

Each ``--config`` (``mix:lr:steps[:temperature[:feature_weight]]``) distils a fresh copy of the refitted student with
:class:`deploycompress.zoo.MixedViews` batches (function matching, Beyer et al. 2022) and prints top-1 agreement, top-5
overlap and logit cosine every ``--eval-every`` steps. ``--noise-images N`` adds N images of coloured 1/f noise to
the training pool (so mixup blends photos with structured noise).

    nice -n 15 python tools/tune_lite0_recovery.py --config mixup:1e-4:300 --config none:2e-4:300 --out runs/tune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import efficientnet_lite0 as recipe  # noqa: E402 - the example's prune, refit and figures

from deploycompress.pruning.distill import distill  # noqa: E402
from deploycompress.zoo import MixedViews, crops, extra_photos, load_efficientnet_lite0, photos, random_crops, split_photos  # noqa: E402


def pink_noise(n: int, size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` images of coloured 1/f noise (amplitude spectrum 1/f per channel, as natural images roughly have),
    ``(size, size, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    out = {}
    for i in range(n):
        spec = (rng.standard_normal((3, size, size)) + 1j * rng.standard_normal((3, size, size))) / f
        im = np.fft.ifft2(spec).real
        im = (im - im.min(axis=(1, 2), keepdims=True)) / np.ptp(im, axis=(1, 2), keepdims=True)
        out[f"noise{i}"] = (im.transpose(1, 2, 0) * 255).astype(np.uint8)
    return out


class EvaluatingViews(MixedViews):
    """:class:`MixedViews` that scores ``student`` on the validation inputs before steps 0, k, 2k, ... (distill asks
    for batch ``i`` at step ``i``; the student is in eval mode throughout)."""

    def __init__(self, student: torch.nn.Module, val: torch.Tensor, reference: np.ndarray, every: int, *a, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*a, **kw)
        self.student, self.val, self.reference, self.every, self.curve = student, val, reference, every, []

    def score(self, step: int) -> None:
        with torch.no_grad():
            s = recipe.agreement(torch.cat([self.student(b) for b in self.val.split(32)]).numpy(), self.reference)
        self.curve.append({"step": step, **s})
        print(f"  step {step}: top-1 {s['top1']:.3f} top-5 {s['top5']:.3f} cosine {s['cosine']:.4f}", flush=True)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i % self.every == 0 and i > 0:
            self.score(i)
        return super().__getitem__(i)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="mix:lr:steps[:temperature[:feature_weight]], repeatable; none: "
                    "the refitted student alone")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-views", type=int, default=120, help="seeded random views of the inner validation photos added to their crops")
    ap.add_argument("--noise-images", type=int, default=0)
    ap.add_argument("--example-args", default="", help="options for the example's prune/refit (its defaults otherwise)")
    ap.add_argument("--cache", type=Path, default=None, help="refitted student weights: written on the first run, loaded after")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opts = recipe.make_parser().parse_args(args.example_args.split())

    dense = load_efficientnet_lite0()
    calib_photos, _ = split_photos(photos())  # the evaluation half is dropped here and never seen
    inner_train, inner_val = split_photos(calib_photos)
    pool = {**inner_train, **extra_photos(), **pink_noise(args.noise_images)}
    calib = crops(inner_train, per_photo=opts.crops_per_photo)
    val = torch.cat([crops(inner_val), random_crops(inner_val, args.val_views, seed=77, scale=(0.25, 1.0), jitter=0.0)])
    with torch.no_grad():
        reference = torch.cat([dense(b) for b in val.split(32)]).numpy()
    print(f"inner train {list(inner_train)} (+{len(pool) - len(inner_train)} unlabelled), inner validation {list(inner_val)}: {len(val)} inputs")
    t0 = time.perf_counter()
    small, refitted, config_list = recipe.prune(dense, pool, calib, calib[:1], opts)
    if args.cache is not None and args.cache.exists():
        recipe.load_weights(small, args.cache)
    else:
        small = refitted if refitted is not None else recipe.refit(dense, small, config_list, pool, calib, opts) if opts.refit else small
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(small.state_dict(), args.cache)
    print(f"prune + refit {time.perf_counter() - t0:.0f} s; refitted student:")
    widths = [(dense.get_submodule(n).out_channels, small.get_submodule(n).out_channels) for c in config_list for n in c["op_names"]]
    print(f"  expansion channels kept {sum(k for _, k in widths)}/{sum(d for d, _ in widths)}: " + ", ".join(f"{k}/{d}" for d, k in widths))
    EvaluatingViews(small, val, reference, 1, pool, 1, 2).score(0)
    blocks = [f"_blocks.{i}" for i in range(len(dense._blocks))]
    results = []
    for spec in args.config:
        mix, lr, steps, *rest = spec.split(":")
        temperature, feature_weight = (float(rest[0]) if rest else 1.0), (float(rest[1]) if len(rest) > 1 else 1.0)
        student = copy.deepcopy(small).eval()
        views = EvaluatingViews(student, val, reference, args.eval_every, pool, int(steps), args.batch, mix=mix)
        print(f"config {spec}", flush=True)
        views.score(0)
        t0 = time.perf_counter()
        log = distill(student, dense, views, steps=int(steps), lr=float(lr), loss="kl", temperature=temperature, hidden=blocks,
                      hidden_weight=feature_weight, schedule="linear", progress=False, train_mode=False)
        views.score(int(steps))
        results.append({"config": spec, "curve": views.curve, "loss": [log.first_loss, log.last_loss], "s": time.perf_counter() - t0})
        print(f"  loss {log.first_loss:.4f} -> {log.last_loss:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

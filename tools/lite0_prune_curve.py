"""Accuracy and latency of ``examples/efficientnet_lite0.py`` against its prune's size: one point per ``--sparsity``.

Each point runs the example (its defaults: Taylor choice over the expansion channels, least-squares refit, no
distillation, ``build_engine`` int8) at one share of the expansion channels and keeps its figures against the dense
fp32 PyTorch model on the evaluation crops: top-1 agreement, top-5 overlap and logit cosine of the pruned int8 graph
(and of the dense int8 / pruned fp32 graphs), the parameters, and the share of expansion channels physically removed
after ``speedup(round_to=16)``. The stages split the work so that only the timing needs an idle machine:

* ``build`` (niced): the example per sparsity, figures merged into ``<workdir>/curve.json`` (points already there
  are replaced), its ONNX files under ``<workdir>/s<sparsity>``;
* ``time`` (alone, e.g. under a lock): the dense fp32, dense int8 and every point's pruned int8 graph timed
  round-robin on onnxruntime CPU at each ``--batch-sizes`` (medians), ratios to dense fp32;
* ``plot``: the curve as a PNG (matplotlib, Agg) and a markdown table on stdout.

    nice -n 15 python tools/lite0_prune_curve.py --stage build --workdir runs/curve --sparsities 0.10,0.15,0.20,0.25
    flock /tmp/bench.lock python tools/lite0_prune_curve.py --stage time --workdir runs/curve --budget 15
    python tools/lite0_prune_curve.py --stage plot --workdir runs/curve --plot docs/img/lite0_prune_curve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tools"))
from bench_efficientnet_lite0 import cpu  # noqa: E402
from bench_ort_int8 import _session, _time_round_robin  # noqa: E402


def _key(sparsity: float) -> str:
    return f"{sparsity:.2f}"


def build(workdir: Path, sparsities: list[float], extra: list[str]) -> dict:
    """Run the example at each sparsity (in this process) and merge its figures into ``workdir/curve.json``."""
    import efficientnet_lite0 as example

    index = workdir / "curve.json"
    curve = json.loads(index.read_text()) if index.is_file() else {"machine": cpu(), "points": {}}
    for sp in sparsities:
        out = workdir / f"s{_key(sp)}"
        res = example.main(["--out", str(out), "--sparsity", str(sp), "--budget", "0", *extra])
        dense_ch = sum(d for d, _ in res["widths"].values())
        kept_ch = sum(s for _, s in res["widths"].values())
        curve["points"][_key(sp)] = {
            "sparsity": sp, "args": extra, "removed": 1 - kept_ch / dense_ch, "params": res["params"],
            "rows": {k: {m: v[m] for m in ("top1", "top5", "cosine", "mb")} for k, v in res["rows"].items()},
            "before": res["before"], "refitted": res["refitted"],
            "paths": {"dense fp32": str(out / "dense/source/model.fp32.onnx"), "dense int8": str(out / "dense/source/model.qdq.onnx"),
                      "pruned int8": str(out / "pruned/source/model.qdq.onnx")},
        }  # fmt: skip
        index.write_text(json.dumps(curve, indent=1))  # after each point: a stopped run keeps what it finished
    return curve


def load(workdirs: list[Path]) -> dict:
    """The points of every ``workdir/curve.json`` (built separately, e.g. one sparsity per process) in one curve."""
    curves = [json.loads((w / "curve.json").read_text()) for w in workdirs]
    merged = {**curves[0], "points": {}}
    for c in curves:
        merged["points"].update(c["points"])
    return merged


def time_points(workdirs: list[Path], batch_sizes: list[int], budget: float, threads: int) -> dict:
    """Round-robin medians of dense fp32, dense int8 and every point's pruned int8 graph, ratios to dense fp32; the
    merged curve with its timing goes to ``workdirs[0]/curve.json``."""
    from deploycompress.zoo import crops, photos, split_photos

    index = workdirs[0] / "curve.json"
    curve = load(workdirs)
    points = dict(sorted(curve["points"].items()))
    first = next(iter(points.values()))["paths"]
    sessions = {"fp32": _session(Path(first["dense fp32"]), threads), "dense int8": _session(Path(first["dense int8"]), threads)}
    sessions.update({k: _session(Path(p["paths"]["pruned int8"]), threads) for k, p in points.items()})
    _, ev = split_photos(photos())
    x = crops(ev, per_photo=1).numpy()  # one crop per evaluation photo (4) ...
    x = np.concatenate([x] * (1 + max(batch_sizes) // len(x)))  # ... repeated up to the largest batch
    name = sessions["fp32"].get_inputs()[0].name
    timing = {"machine": cpu(), "budget": budget, "threads": threads}
    for bs in batch_sizes:
        times = _time_round_robin(sessions, {name: x[:bs]}, budget)
        base = float(np.median(times["fp32"]))
        timing[f"b{bs}"] = {k: {"ms": float(np.median(v)), "x": float(np.median(v)) / base} for k, v in times.items()}
        print(f"batch {bs}: " + ", ".join(f"{k} {v['ms']:.2f} ms ({v['x']:.2f}x)" for k, v in timing[f"b{bs}"].items()), flush=True)
    curve["timing"] = timing
    index.write_text(json.dumps(curve, indent=1))
    return curve


def table(curve: dict) -> str:
    """The curve as a markdown table (latency columns only after ``--stage time``)."""
    timing = curve.get("timing", {})
    bss = sorted(int(k[1:]) for k in timing if k.startswith("b") and k[1:].isdigit())
    head = ("| expansion channels masked | physically removed | params | pruned fp32 top-1 | int8 top-1 | int8 top-5 | int8 cosine | "
            + " | ".join(f"int8 b{b} x dense fp32" for b in bss) + " |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    points = sorted(curve["points"].items())
    dense = points[0][1]["rows"]["dense int8"]
    lat = lambda k: " | ".join(f"{timing[f'b{b}'][k]['x']:.2f}x" for b in bss)  # noqa: E731
    lines.append(f"| 0 (dense int8) | 0 | 1.00x | - | {dense['top1']:.3f} | {dense['top5']:.3f} | {dense['cosine']:.4f} | "
                 + (lat("dense int8") if bss else "") + " |")  # fmt: skip
    for k, p in points:
        r, f = p["rows"]["pruned int8"], p["rows"]["pruned fp32"]
        lines.append(f"| {k} | {p['removed']:.3f} | {p['params'][1] / p['params'][0]:.2f}x | {f['top1']:.3f} | {r['top1']:.3f} | "
                     f"{r['top5']:.3f} | {r['cosine']:.4f} | " + (lat(k) if bss else "") + " |")  # fmt: skip
    return "\n".join(lines)


def plot(curve: dict, path: Path) -> None:
    """Top-1 agreement, top-5 overlap and cosine of the pruned int8 graph against the share physically removed, the
    dense int8 level dashed, and (after ``--stage time``) the batch-1 latency ratio on a second axis."""
    from matplotlib.figure import Figure

    points = sorted(curve["points"].values(), key=lambda p: p["removed"])
    x = [0.0] + [100 * p["removed"] for p in points]
    dense = points[0]["rows"]["dense int8"]
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.add_subplot()
    for metric, label, style in (("top1", "int8 top-1 agreement", "o-"), ("top5", "int8 top-5 overlap", "s-"), ("cosine", "int8 logit cosine", "^-")):
        ax.plot(x, [dense[metric]] + [p["rows"]["pruned int8"][metric] for p in points], style, label=label)
    ax.axhline(dense["top1"], color="grey", ls=":", lw=1)
    ax.set_xlabel("expansion channels physically removed (%)")
    ax.set_ylabel("vs dense fp32 on the evaluation crops")
    ax.set_ylim(0, 1.02)
    timing = curve.get("timing", {}).get("b1")
    if timing:
        ax2 = ax.twinx()
        ax2.plot(x, [timing["dense int8"]["x"]] + [timing[_key(p["sparsity"])]["x"] for p in points], "k--", label="int8 batch-1 latency")
        ax2.set_ylabel("batch-1 latency (x dense fp32)")
        ax2.set_ylim(0, max(0.8, 1.1 * max(v["x"] for k, v in timing.items() if k != "fp32")))
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("EfficientNet-Lite0: Taylor prune + refit + int8 (0 = dense int8)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("build", "time", "plot"), required=True)
    ap.add_argument("--workdir", type=Path, nargs="+", required=True,
                    help="build: one folder; time/plot: the folders of the points (merged into the first one's curve.json)")
    ap.add_argument("--sparsities", default="0.10,0.15,0.20,0.25", help="build: comma-separated shares of the expansion channels")
    ap.add_argument("--example-args", default="", help="build: further options of the example, e.g. '--crops-per-photo 2'")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--budget", type=float, default=15.0, help="time: seconds of round-robin timing per batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=None, help="plot: the PNG to write")
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if not all(0 < s < 1 for s in sparsities):
        ap.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    missing = [str(w / "curve.json") for w in args.workdir if not (w / "curve.json").is_file()]
    if args.stage == "build" and len(args.workdir) != 1:
        ap.error("--stage build writes one --workdir")
    if args.stage != "build" and missing:
        ap.error(f"{', '.join(missing)} not found: run --stage build first")
    if args.stage == "build":
        curve = build(args.workdir[0], sparsities, args.example_args.split())
    elif args.stage == "time":
        curve = time_points(args.workdir, [int(b) for b in args.batch_sizes.split(",")], args.budget, args.threads)
    else:
        curve = load(args.workdir)
        if args.plot:
            plot(curve, args.plot)
    print(table(curve))
    return curve


if __name__ == "__main__":
    main()

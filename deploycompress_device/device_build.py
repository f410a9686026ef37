"""``python -m deploycompress_device BUNDLE``: build ``model.plan`` on the device from a portable bundle.

Steps (each failure raises DeviceBuildError and leaves the bundle as it was):

1. verify the bundle's sha256 table, read ``tensorrt/build_plan.json``;
2. check the graph against the ONNX-TensorRT operator table (and DLA's rules with ``--dla-core``);
3. build the engine (:func:`deploycompress_device.trt.build_engine`);
4. run the golden inputs and compare with the PyTorch outputs stored next to them, against the plan's
   tolerances (max absolute error, cosine similarity, top-1 agreement for 2-D outputs);
5. profile: latency percentiles and per-layer times (IProfiler);
6. write the Triton ``tensorrt_plan`` model (``model_repository/<name>/config.pbtxt`` + ``1/model.plan``),
   ``tensorrt/device_report.json`` and the updated manifest (TensorRT version, GPU name, compute
   capability, sha256 of every file): new files are renamed into place, the manifest last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from . import DeviceBuildError
from .checks import Finding, check_dla, check_operators, errors
from .files import MANIFEST_NAME, hash_tree, write_bytes_atomic
from .plan import PLAN_NAME, BuildOptions, BuildPlan

__all__ = ["DeviceBuildResult", "compare_golden", "device_build", "main", "GOLDEN_INPUT", "GOLDEN_OUTPUT"]

log = logging.getLogger(__name__)

GOLDEN_INPUT = "input:"
GOLDEN_OUTPUT = "output:"
PLAN_PATH = f"tensorrt/{PLAN_NAME}"
REPORT_PATH = "tensorrt/device_report.json"


@dataclass
class DeviceBuildResult:
    """What the device build wrote and measured."""

    bundle: Path
    plan_path: Path
    precision: str
    tensorrt_version: str
    gpu: dict[str, str]
    fidelity: dict[str, dict[str, float]]
    latency_ms: dict[str, float]
    layers: list[dict[str, Any]] = field(default_factory=list)
    dla_fallback: list[str] = field(default_factory=list)
    strongly_typed: bool = False


def _verify(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeviceBuildError(f"{path}: not a bundle manifest ({exc})") from exc
    actual = hash_tree(root)
    listed = manifest.get("files", {})
    changed = sorted(f for f in listed if f in actual and actual[f] != listed[f])
    missing = sorted(set(listed) - set(actual))
    if changed or missing:
        raise DeviceBuildError(f"bundle {root} failed verification: changed {changed}, missing {missing}")
    if manifest.get("backend") != "tensorrt":
        raise DeviceBuildError(f"bundle {root} was built for backend {manifest.get('backend')!r}, not tensorrt")
    return manifest


def compare_golden(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max absolute error, cosine similarity (flattened, float64) and, for 2-D outputs, the
    share of rows whose argmax agrees."""
    out: dict[str, dict[str, float]] = {}
    for name, ref in expected.items():
        if name not in actual:
            raise DeviceBuildError(f"the engine has no output {name!r} (outputs: {sorted(actual)})")
        a, r = np.asarray(actual[name], dtype=np.float64), np.asarray(ref, dtype=np.float64)
        if a.shape != r.shape:
            raise DeviceBuildError(f"output {name!r}: engine shape {a.shape} != golden shape {r.shape}")
        denom = float(np.linalg.norm(a) * np.linalg.norm(r))
        stats = {"max_abs": float(np.max(np.abs(a - r))) if a.size else 0.0,
                 "cosine": float(np.dot(a.ravel(), r.ravel()) / denom) if denom > 0 else float(np.array_equal(a, r))}
        if a.ndim == 2 and a.shape[1] > 1:
            stats["top1_agreement"] = float(np.mean(a.argmax(1) == r.argmax(1)))
        out[name] = stats
    return out


def _within(stats: Mapping[str, float], tol: Mapping[str, float]) -> list[str]:
    bad = []
    if "max_abs" in tol and stats["max_abs"] > tol["max_abs"]:
        bad.append(f"max_abs {stats['max_abs']:.4g} > {tol['max_abs']:.4g}")
    if "min_cosine" in tol and stats["cosine"] < tol["min_cosine"]:
        bad.append(f"cosine {stats['cosine']:.6f} < {tol['min_cosine']}")
    if "min_top1_agreement" in tol and "top1_agreement" in stats and stats["top1_agreement"] < tol["min_top1_agreement"]:
        bad.append(f"top-1 agreement {stats['top1_agreement']:.3f} < {tol['min_top1_agreement']}")
    return bad


def _golden(root: Path, plan: BuildPlan) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if not plan.golden:
        raise DeviceBuildError("the build plan names no golden inputs/outputs")
    with np.load(root / plan.golden, allow_pickle=False) as data:
        inputs = {k[len(GOLDEN_INPUT):]: data[k] for k in data.files if k.startswith(GOLDEN_INPUT)}
        outputs = {k[len(GOLDEN_OUTPUT):]: data[k] for k in data.files if k.startswith(GOLDEN_OUTPUT)}
    if not inputs or not outputs:
        raise DeviceBuildError(f"{plan.golden}: needs '{GOLDEN_INPUT}<name>' and '{GOLDEN_OUTPUT}<name>' arrays")
    return inputs, outputs


def _latency(runner: Any, feeds: Mapping[str, np.ndarray], iterations: int) -> dict[str, float]:
    for _ in range(3):
        runner.run(feeds)
    times = []
    for _ in range(max(1, iterations)):
        start = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    t = np.asarray(times)
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99)),
            "mean": float(t.mean()), "batch": float(batch), "throughput_per_s": float(batch * 1000.0 / t.mean())}


def device_build(
    bundle: str | os.PathLike[str],
    *,
    precision: str | None = None,
    options: Mapping[str, Any] | None = None,
    iterations: int = 50,
    check: bool = True,
) -> DeviceBuildResult:
    """Build, check, profile and publish the engine of a portable bundle (see the module docstring).

    ``options`` override the plan's :class:`~deploycompress_device.plan.BuildOptions` (e.g. ``dla_core``).
    ``check=False`` skips the golden comparison; the report and manifest then say ``"checked": false``.
    """
    from . import cudart
    from .trt import TrtRunner, build_engine, tensorrt_module

    root = Path(bundle)
    manifest = _verify(root)
    tensorrt_module()  # fail before any work when TensorRT is absent
    plan = BuildPlan.load(root / PLAN_PATH)
    precision = precision or plan.precision
    if precision not in plan.graphs:
        raise DeviceBuildError(f"the bundle has no {precision} graph; it has {sorted(plan.graphs)}")
    opts = BuildOptions.from_dict({**plan.options.to_dict(), **dict(options or {})})
    graph = root / plan.graphs[precision]
    from .trt import tensorrt_version

    version = "%d.%d" % tensorrt_version()
    model = onnx.load(str(graph), load_external_data=False)
    findings: list[Finding] = check_operators(model, version)
    if opts.dla_core is not None:
        static = {n: list(p.opt) for n, p in plan.profiles.items() if p.static}
        findings += check_dla(model, trt_version=version, precision=precision, gpu_fallback=opts.gpu_fallback, static_shapes=static).findings
    for f in findings:
        (log.error if f.severity == "error" else log.warning)("%s [%s] %s", f.node, f.rule, f.message)
    if errors(findings):
        raise DeviceBuildError("pre-build checks failed:\n  " + "\n  ".join(f"{f.node}: [{f.rule}] {f.message}" for f in errors(findings)))

    built = build_engine(graph, precision=precision, profiles=plan.profiles, options=opts)
    with tempfile.TemporaryDirectory(prefix=".device-build.", dir=root) as tmp:
        staged_plan = write_bytes_atomic(Path(tmp) / "model.plan", built.plan)
        runner = TrtRunner(staged_plan)
        golden_in, golden_out = _golden(root, plan)
        fidelity = compare_golden(golden_out, runner.run(golden_in))
        tol = plan.tolerances.get(precision, {})
        problems = {name: _within(stats, tol) for name, stats in fidelity.items()}
        problems = {k: v for k, v in problems.items() if v}
        if problems and check:
            raise DeviceBuildError(f"the {precision} engine differs from the golden outputs beyond the plan's tolerances {tol}: {problems}")
        if problems:
            log.warning("golden check skipped on request; the engine is outside the tolerances: %s", problems)
        one = {n: a[:1] for n, a in golden_in.items()}
        latency = _latency(runner, one, iterations)
        layers = runner.profile(one, iterations=max(5, iterations // 5))
        gpu = cudart.device_info()
        del runner

        name = str(manifest["name"])
        rel_plan = f"model_repository/{name}/1/model.plan"
        rel_config = f"model_repository/{name}/config.pbtxt"
        report = {"precision": precision, "tensorrt": built.tensorrt_version, "gpu": gpu, "strongly_typed": built.strongly_typed,
                  "options": opts.to_dict(), "fidelity": fidelity, "tolerances": tol, "checked": bool(check),
                  "within_tolerances": not problems, "latency_ms": latency, "layers": layers, "engine_layers": built.layers,
                  "dla_fallback": built.dla_fallback, "builder_warnings": built.warnings[:200],
                  "findings": [f.to_dict() for f in findings]}
        staged = {
            rel_plan: built.plan,
            REPORT_PATH: json.dumps(report, indent=1).encode(),
        }
        if plan.triton_config:
            staged[rel_config] = (root / plan.triton_config).read_bytes()
        for rel, data in staged.items():
            write_bytes_atomic(root / rel, data)

    manifest = dict(manifest)
    manifest["artifact"] = rel_plan
    manifest["precision"] = precision
    env = dict(manifest.get("environment") or {})
    env["versions"] = {**dict(env.get("versions") or {}), "tensorrt": built.tensorrt_version}
    env["gpu"] = gpu
    manifest["environment"] = env
    extra = dict(manifest.get("extra") or {})
    extra["tensorrt"] = {**dict(extra.get("tensorrt") or {}), "status": "built", "report": REPORT_PATH,
                         "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest["extra"] = extra
    manifest["files"] = hash_tree(root)
    write_bytes_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    log.info("device build: %s (%s, TensorRT %s, %s) p50 %.3f ms", rel_plan, precision, built.tensorrt_version, gpu.get("name"), latency["p50"])
    return DeviceBuildResult(root, root / rel_plan, precision, built.tensorrt_version, gpu, fidelity, latency, layers,
                             built.dla_fallback, built.strongly_typed)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m deploycompress_device",
                                          description="Build model.plan from a portable deploycompress bundle (numpy, onnx, tensorrt only).")
    p.add_argument("bundle", help="bundle directory written by build_engine(..., backend='tensorrt') without TensorRT")
    p.add_argument("--precision", choices=("int8", "fp16", "fp32"), help="graph to build (default: the plan's)")
    p.add_argument("--iterations", type=int, default=50, help="timed runs for the latency figures")
    p.add_argument("--dla-core", type=int, help="build for this DLA core (layers DLA cannot run fall back to the GPU)")
    p.add_argument("--no-gpu-fallback", action="store_true", help="with --dla-core: fail instead of running layers on the GPU")
    p.add_argument("--workspace-mib", type=int, help="builder workspace memory pool limit (MiB)")
    p.add_argument("--optimization-level", type=int, help="builder optimization level 0-5")
    p.add_argument("--timing-cache", help="timing cache file, loaded before and saved after the build")
    p.add_argument("--no-check", action="store_true", help="publish even when the golden outputs are outside the tolerances (said in the report)")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    for key in ("dla_core", "workspace_mib", "optimization_level", "timing_cache"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if args.no_gpu_fallback:
        options["gpu_fallback"] = False
    try:
        result = device_build(args.bundle, precision=args.precision, options=options, iterations=args.iterations, check=not args.no_check)
    except (DeviceBuildError, ValueError) as exc:
        print(f"device-build: {exc}", file=sys.stderr)
        return 1
    worst = {n: s for n, s in result.fidelity.items()}
    print(json.dumps({"plan": str(result.plan_path), "precision": result.precision, "tensorrt": result.tensorrt_version,
                      "gpu": result.gpu, "fidelity": worst, "latency_ms": result.latency_ms,
                      "dla_fallback": result.dla_fallback}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_from_args(build_parser().parse_args(argv))

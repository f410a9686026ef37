"""The portable TensorRT bundle: everything a device needs to build and check ``model.plan`` itself.

Written by ``build_engine(..., backend="tensorrt")`` on a machine without TensorRT (engines are specific
to the GPU and the TensorRT version, so they are built where they run)::

    manifest.json                        backend "tensorrt", extra.tensorrt.status "pending-device-build"
    tensorrt/build_plan.json             precision, graphs, profiles, options, tolerances, TensorRT range
    tensorrt/model.int8.onnx             QDQ graph (S8S8, zero point 0) - int8 engines
    tensorrt/model.fp16.onnx             fp16 graph - fp16 engines (TensorRT 11: the only way to fp16)
    tensorrt/golden.npz                  "input:<name>" / "output:<name>": samples and the PyTorch outputs
    tensorrt/config.pbtxt                the Triton tensorrt_plan config, copied next to model.plan
    tensorrt/commands.sh                 equivalent trtexec / polygraphy lines for TensorRT 10 and 11
    device/deploycompress_device/        the torch-free builder: PYTHONPATH=device python -m deploycompress_device .

On the device, ``python -m deploycompress_device BUNDLE`` adds ``model_repository/<name>/{config.pbtxt,
1/model.plan}`` and ``tensorrt/device_report.json`` and rewrites the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from deploycompress_device.device_build import GOLDEN_INPUT, GOLDEN_OUTPUT, PLAN_PATH
from deploycompress_device.plan import BuildPlan

from ..backends.base import TensorSpec
from .atomic import BundleError, atomic_output_dir
from .manifest import Manifest, hash_tree
from .triton import served_max_batch_size, triton_config

if TYPE_CHECKING:
    from ..quantization.calib_config import CalibConfig
    from ..report.schema import Report

__all__ = ["DEVICE_COMMAND", "PENDING", "write_portable_bundle"]

log = logging.getLogger(__name__)

PENDING = "pending-device-build"
DEVICE_COMMAND = "PYTHONPATH=device python3 -B -m deploycompress_device ."


def _copy_device_package(dst: Path) -> None:
    import deploycompress_device

    src = Path(deploycompress_device.__file__).resolve().parent
    shutil.copytree(src, dst / "deploycompress_device", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _commands_script(plan: BuildPlan) -> str:
    lines = ["#!/bin/sh", "# Equivalent command lines for this bundle's engine (run from the bundle directory).",
             "# TensorRT 11: strongly typed only, precision comes from the graph (no --int8/--fp16 flags).",
             "# TensorRT 10: strongly typed for Q/DQ or fp16 graphs; builder flags for fp32 graphs.",
             f"# The checked build (golden outputs, Triton model, manifest): {DEVICE_COMMAND}", ""]
    for key, cmd in plan.commands().items():
        lines += [f"# {key}", f"# {cmd}", ""]
    return "\n".join(lines)


def write_portable_bundle(
    out_dir: str | os.PathLike[str],
    *,
    plan: BuildPlan,
    graph_files: Mapping[str, str | os.PathLike[str]],
    golden_inputs: Mapping[str, np.ndarray],
    golden_outputs: Mapping[str, np.ndarray],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    calibration: "CalibConfig | None" = None,
    report: "Report | None" = None,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write the bundle atomically. ``graph_files`` maps each path in ``plan.graphs`` to the file to copy."""
    missing = sorted(set(plan.graphs.values()) - set(graph_files))
    if missing:
        raise BundleError(f"portable bundle: no file given for the plan's graph(s) {missing}")
    for rel, src in {**dict(graph_files), **dict(extra_files or {})}.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"bundle file name {rel!r} must be a relative path inside the bundle")
        if not Path(src).is_file():
            raise BundleError(f"file {str(src)!r} (for {rel!r}) does not exist")
    names_in, names_out = {t.name for t in inputs}, {t.name for t in outputs}
    if set(golden_inputs) != names_in or set(golden_outputs) != names_out:
        raise BundleError(f"golden data must name the inputs {sorted(names_in)} and outputs {sorted(names_out)}; "
                          f"got {sorted(golden_inputs)} and {sorted(golden_outputs)}")
    with atomic_output_dir(out_dir, overwrite=overwrite) as root:
        for rel, src in {**dict(graph_files), **dict(extra_files or {})}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / rel)
        tdir = root / "tensorrt"
        tdir.mkdir(exist_ok=True)
        arrays = {f"{GOLDEN_INPUT}{k}": np.asarray(v) for k, v in golden_inputs.items()}
        arrays.update({f"{GOLDEN_OUTPUT}{k}": np.asarray(v) for k, v in golden_outputs.items()})
        np.savez_compressed(root / (plan.golden or "tensorrt/golden.npz"), **arrays)  # type: ignore[arg-type]
        (root / (plan.triton_config or "tensorrt/config.pbtxt")).write_text(
            triton_config(plan.name, "tensorrt", inputs, outputs, max_batch_size=plan.max_batch_size))
        plan.save(root / PLAN_PATH)
        (tdir / "commands.sh").write_text(_commands_script(plan))
        _copy_device_package(root / "device")
        if calibration is not None:
            calibration.save(root / "calibration.json")
        if report is not None:
            report.save(root)
        manifest = Manifest(
            name=plan.name,
            backend="tensorrt",
            precision=plan.precision,
            artifact=plan.graphs[plan.precision],
            inputs=list(inputs),
            outputs=list(outputs),
            max_batch_size=served_max_batch_size(inputs, outputs, plan.max_batch_size),
            calibration_digest=calibration.digest() if calibration is not None else None,
            extra={**dict(extra or {}), "tensorrt": {"status": PENDING, "plan": PLAN_PATH, "device_command": DEVICE_COMMAND,
                                                     "tensorrt_range": dict(plan.tensorrt)}},
        )
        manifest.files = hash_tree(root)
        manifest.save(root)
    log.warning("TensorRT is not installed here: wrote a portable bundle to %s; build the engine on the device with "
                "`deploycompress device-build %s`, or without deploycompress installed `%s` (run in the bundle directory)",
                out_dir, out_dir, DEVICE_COMMAND)
    return manifest

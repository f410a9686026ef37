"""Assemble a serving bundle: Triton model repository, calibration, reports, then the manifest."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..backends.base import TensorSpec
from .atomic import BundleError, atomic_output_dir
from .manifest import Manifest, hash_tree
from .triton import served_max_batch_size, write_model_repository

if TYPE_CHECKING:
    from ..quantization.calib_config import CalibConfig
    from ..report.schema import Report

__all__ = ["write_bundle", "CALIBRATION_NAME", "REPOSITORY_DIR"]

log = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"
REPOSITORY_DIR = "model_repository"


def write_bundle(
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    backend: str,
    artifact: str | os.PathLike[str],
    precision: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    calibration: "CalibConfig | None" = None,
    report: "Report | None" = None,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    max_batch_size: int = 32,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write the bundle to ``out_dir`` atomically and return its manifest.

    ``extra_files`` maps a relative path inside the bundle to a file to copy there (the fp32 ONNX,
    the masks), so everything the engine was made from travels and is checksummed with it.
    """
    artifact = Path(artifact)
    if not artifact.is_file():
        raise BundleError(f"artifact {str(artifact)!r} does not exist")
    for rel, src in (extra_files or {}).items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"extra file name {rel!r} must be a relative path inside the bundle")
        if not Path(src).is_file():
            raise BundleError(f"extra file {str(src)!r} (for {rel!r}) does not exist")
    with atomic_output_dir(out_dir, overwrite=overwrite) as root:
        target = write_model_repository(root / REPOSITORY_DIR, name, backend, artifact, inputs, outputs, max_batch_size=max_batch_size)
        if calibration is not None:
            calibration.save(root / CALIBRATION_NAME)
        for rel, src in (extra_files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / rel)
        if report is not None:
            report.save(root)
        manifest = Manifest(
            name=name,
            backend=backend,
            precision=precision,
            artifact=target.relative_to(root).as_posix(),
            inputs=list(inputs),
            outputs=list(outputs),
            max_batch_size=served_max_batch_size(inputs, outputs, max_batch_size),
            calibration_digest=calibration.digest() if calibration is not None else None,
            extra=dict(extra or {}),
        )
        manifest.files = hash_tree(root)
        manifest.save(root)
    return manifest

"""manifest.json: what a bundle holds, what produced it, and a sha256 for every file in it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from deploycompress_device import files as _files  # one file table, host and device
from deploycompress_device.files import MANIFEST_NAME, sha256_file

from ..backends.base import TensorSpec
from ..report.schema import check_versioned, read_json
from .atomic import BundleError

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "Manifest", "bundle_files", "collect_environment", "sha256_file", "hash_tree"]

MANIFEST_VERSION = 1
_VERSIONED = ("deploycompress", "torch", "onnx", "onnxruntime", "tensorrt")


def bundle_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root``; a symlink or other non-regular entry is a :class:`BundleError`
    naming it, raised before any file is opened (see ``deploycompress_device.files.bundle_files``)."""
    try:
        return _files.bundle_files(root)
    except _files.UnsafeBundleFile as exc:
        raise BundleError(str(exc)) from None


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every bundle file but the manifest, keyed by POSIX relative path (links refused)."""
    try:
        return _files.hash_tree(root)
    except _files.UnsafeBundleFile as exc:
        raise BundleError(str(exc)) from None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict[str, Any] | None:
    """The GPU an engine was built for; engines (TensorRT plans) only run on the same compute capability."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def collect_environment() -> dict[str, Any]:
    """Versions (tensorrt read from package metadata, never imported), host CPU and GPU."""
    return {
        "versions": {name: _version(name) for name in _VERSIONED},
        "python": platform.python_version(),
        "host": {"cpu": _cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(), "system": platform.system()},
        "gpu": _gpu(),
    }


@dataclass
class Manifest:
    """The bundle's table of contents. ``artifact`` is the relative path of the file a backend loads."""

    name: str
    backend: str
    precision: str
    artifact: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    files: dict[str, str] = field(default_factory=dict)
    calibration_digest: str | None = None
    environment: dict[str, Any] = field(default_factory=collect_environment)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision,
            "artifact": self.artifact,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "max_batch_size": self.max_batch_size,
            "calibration_digest": self.calibration_digest,
            "created": self.created,
            "environment": self.environment,
            "files": dict(self.files),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest") -> "Manifest":
        check_versioned(data, MANIFEST_VERSION, BundleError, f"{source}: manifest")
        missing = [k for k in ("name", "backend", "precision", "artifact", "inputs", "outputs", "files") if k not in data]
        if missing:
            raise BundleError(f"{source}: missing field(s) {missing}")
        return cls(
            name=str(data["name"]),
            backend=str(data["backend"]),
            precision=str(data["precision"]),
            artifact=str(data["artifact"]),
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            max_batch_size=int(data.get("max_batch_size", 0)),
            files=dict(data["files"]),
            calibration_digest=data.get("calibration_digest"),
            environment=dict(data.get("environment") or {}),
            created=str(data.get("created", "")),
            extra=dict(data.get("extra") or {}),
        )

    def save(self, root: Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> "Manifest":
        path = Path(root) / MANIFEST_NAME
        return cls.from_dict(read_json(path, BundleError, "bundle manifest"), source=str(path))

"""Open a bundle only after checking that every file is the one the manifest names, and load exactly
the bytes that were checked.

Verification, in this order (nothing outside the bundle is ever opened):

1. the tree is walked without following links: a symbolic link anywhere, or a non-regular file, is
   refused by name before any file is read;
2. every path the manifest names (``files``, ``artifact``) is relative and resolves under the root;
3. every file's sha256 matches, nothing is missing, nothing was added;
4. the manifest's fields agree with what the bundle holds: the artifact is a listed file in the Triton
   repository ``model_repository/<name>/1/``; that repository holds exactly the model ``name`` with
   exactly the version folder written (``1``), and its ``config.pbtxt`` names the same model; the
   backend's artifact file name; ``precision`` against the presence of QuantizeLinear/DequantizeLinear
   in an ONNX artifact.

:func:`load_bundle` reads the artifact once, hashes those bytes, and hands the same bytes to the backend
(``load_bytes``, e.g. onnxruntime's ``InferenceSession(bytes)``) or, for a backend that only loads
files, a private copy written from them: swapping the file after verification changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..backends.base import Runner
from .atomic import BundleError
from .manifest import MANIFEST_NAME, Manifest, bundle_files

__all__ = ["verify_bundle", "load_bundle", "open_bundle", "read_verified"]

_REPOSITORY = "model_repository"
_VERSION = "1"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# onnxruntime's integer operators (com.microsoft), as deploycompress.hf.linear_int8's integer/dynamic flavours write them
_INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul")
_CONFIG_NAME = re.compile(r'^\s*name\s*:\s*"([^"]*)"', re.MULTILINE)


def _read_nofollow(path: Path) -> bytes:
    """The file's bytes, refusing a symbolic link even if one appeared since the walk."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BundleError(f"cannot open {str(path)!r} inside the bundle without following links: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root/rel`` for a relative POSIX path that stays under ``root``; else a BundleError naming ``what``."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel.startswith("~"):
        raise BundleError(f"bundle {str(root)!r}: manifest {what} {rel!r} must be a relative path inside the bundle")
    path = root.joinpath(*pure.parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle {str(root)!r}: manifest {what} {rel!r} resolves outside the bundle")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify(root: Path, keep: Iterable[str] = ()) -> tuple[Manifest, dict[str, bytes]]:
    """Verify the bundle (see the module docstring); return the manifest and the verified bytes of ``keep``."""
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    files = bundle_files(root)  # refuses links before anything is read
    if MANIFEST_NAME not in files:
        raise BundleError(f"bundle {str(root)!r} has no {MANIFEST_NAME}; it is not a bundle written by deploycompress")
    manifest = Manifest.load(root)
    for rel in manifest.files:
        _inside(root, rel, "file")
    _inside(root, manifest.artifact, "artifact")
    keep = set(keep) | {manifest.artifact}
    actual: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    for rel, path in files.items():
        if rel == MANIFEST_NAME:
            continue
        data = _read_nofollow(path)
        actual[rel] = _sha256(data)
        if rel in keep:
            kept[rel] = data
    missing = sorted(set(manifest.files) - set(actual))
    changed = sorted(f for f in manifest.files if f in actual and actual[f] != manifest.files[f])
    added = sorted(set(actual) - set(manifest.files))
    problems = []
    if changed:
        problems.append(f"checksum mismatch (file modified after the bundle was written): {changed}")
    if missing:
        problems.append(f"missing: {missing}")
    if added:
        problems.append(f"not in the manifest: {added}")
    if problems:
        raise BundleError(f"bundle {str(root)!r} failed verification; " + "; ".join(problems) + ". Rebuild it or restore the original files.")
    _cross_check(root, manifest, files, kept)
    return manifest, kept


def _cross_check(root: Path, manifest: Manifest, files: dict[str, Path], kept: dict[str, bytes]) -> None:
    """The manifest's fields against the files and the graph (every file here was already hash-verified)."""
    where = f"bundle {str(root)!r}"
    if manifest.artifact not in manifest.files:
        raise BundleError(f"{where}: artifact {manifest.artifact!r} is not among the manifest's files")
    from .tensorrt_portable import PENDING
    from .triton import TRITON_PLATFORMS

    pending = (manifest.extra or {}).get("tensorrt", {}).get("status") == PENDING  # a portable TensorRT bundle: the
    if manifest.backend in TRITON_PLATFORMS and not pending:  # plan (and its Triton model) is built on the device
        expected = f"{_REPOSITORY}/{manifest.name}/{_VERSION}/{TRITON_PLATFORMS[manifest.backend][1]}"
        if manifest.artifact != expected:
            raise BundleError(f"{where}: manifest artifact {manifest.artifact!r} is not the {manifest.backend} model of "
                              f"Triton model {manifest.name!r} ({expected!r})")
    if manifest.artifact.endswith(".onnx"):
        _check_precision(where, manifest, kept[manifest.artifact])
    if pending and not (root / _REPOSITORY).exists():  # the device adds the Triton model with the plan
        return
    repo_entries = {PurePosixPath(rel).parts[1] for rel in files if rel.startswith(f"{_REPOSITORY}/") and len(PurePosixPath(rel).parts) > 2}
    repo_dirs = {p.name for p in (root / _REPOSITORY).iterdir()} if (root / _REPOSITORY).is_dir() else set()
    if repo_dirs | repo_entries != {manifest.name}:
        raise BundleError(f"{where}: {_REPOSITORY}/ holds {sorted(repo_dirs | repo_entries)}; the manifest names model {manifest.name!r} only")
    model_dir = root / _REPOSITORY / manifest.name
    versions = sorted(p.name for p in model_dir.iterdir() if p.is_dir())
    if versions != [_VERSION]:
        raise BundleError(f"{where}: {_REPOSITORY}/{manifest.name}/ has version folder(s) {versions}; the bundle wrote exactly "
                          f"[{_VERSION!r}] (Triton would serve every numbered folder): remove the others")
    config_rel = f"{_REPOSITORY}/{manifest.name}/config.pbtxt"
    if config_rel in files:
        found = _CONFIG_NAME.search(_read_nofollow(files[config_rel]).decode("utf-8", "replace"))
        if found is None or found.group(1) != manifest.name:
            raise BundleError(f"{where}: {config_rel} names model {found.group(1) if found else None!r}, the manifest {manifest.name!r}")


def _check_precision(where: str, manifest: Manifest, data: bytes) -> None:
    import onnx

    try:
        graph = onnx.load_model_from_string(data).graph
    except Exception as exc:
        raise BundleError(f"{where}: artifact {manifest.artifact!r} is not an ONNX model: {exc}") from None
    has_qdq = any(n.op_type in _QDQ_OPS for n in graph.node)
    if manifest.precision == "int8" and not has_qdq and not any(n.op_type in _INTEGER_OPS for n in graph.node):
        raise BundleError(f"{where}: manifest precision 'int8' but {manifest.artifact!r} holds no QuantizeLinear/DequantizeLinear nor integer MatMul ops")
    if manifest.precision == "fp32" and has_qdq:
        raise BundleError(f"{where}: manifest precision 'fp32' but {manifest.artifact!r} holds Q/DQ nodes (an int8 graph)")
    if manifest.precision not in ("int8", "fp32", "fp16"):
        raise BundleError(f"{where}: manifest precision {manifest.precision!r} is not one of ['fp16', 'fp32', 'int8']")


def verify_bundle(root: str | os.PathLike[str]) -> Manifest:
    """Return the manifest if the bundle passes every check of the module docstring; else raise BundleError."""
    return _verify(Path(root))[0]


def read_verified(root: str | os.PathLike[str], *members: str, optional: Iterable[str] = ()) -> tuple[Manifest, dict[str, bytes]]:
    """Verify the bundle and return the verified bytes, read once, of the artifact, of ``members``
    (relative paths; a missing one is an error) and of those ``optional`` ones the bundle holds."""
    manifest, kept = _verify(Path(root), [*members, *optional])
    missing = [m for m in members if m not in kept]
    if missing:
        raise BundleError(f"bundle {str(root)!r} holds no file(s) {missing}")
    return manifest, kept


def load_bundle(root: str | os.PathLike[str], *, verify: bool = True, member: str | None = None, backend: str | None = None,
                **options) -> Runner:
    """Verify the bundle, then load the verified bytes of the artifact (or of another ``member`` such as
    ``source/model.fp32.onnx``, with ``backend``) with the backend that built it.

    ``verify=False`` skips the checksums but still refuses links and paths outside the bundle.
    """
    return open_bundle(root, verify=verify, member=member, backend=backend, **options)[1]


def open_bundle(root: str | os.PathLike[str], *, verify: bool = True, member: str | None = None, backend: str | None = None,
                **options) -> tuple[Manifest, Runner]:
    """:func:`load_bundle` that also returns the manifest it verified (read once with the files)."""
    root = Path(root)
    if verify:
        manifest, kept = _verify(root, [member] if member else [])
    else:
        bundle_files(root)
        manifest = Manifest.load(root)
        kept = {}
    rel = member or manifest.artifact
    path = _inside(root, rel, "member")
    data = kept.get(rel)
    if data is None:
        if verify:
            raise BundleError(f"bundle {str(root)!r} holds no file {rel!r}")
        data = _read_nofollow(path)
    from ..backends import BackendError, get_backend

    status = (manifest.extra.get("tensorrt") or {}).get("status") if isinstance(manifest.extra, dict) else None
    if member is None and status == "pending-device-build" and (backend or manifest.backend) == "tensorrt":
        raise BackendError(
            f"tensorrt: {Path(rel).name} is the graph of a portable bundle, not an engine; build it on the device first: "
            f"deploycompress device-build {root} (where deploycompress is not installed: PYTHONPATH={root}/device python3 -B "
            f"-m deploycompress_device {root}). Here its graphs run on onnxruntime: "
            f"load_bundle({str(root)!r}, member='source/model.fp32.onnx', backend='onnxruntime')")
    engine = get_backend(backend or manifest.backend)
    if hasattr(engine, "load_bytes"):
        return manifest, engine.load_bytes(data, name=str(path), **options)
    return manifest, _load_private_copy(engine, data, Path(rel).name, options)


def _load_private_copy(engine, data: bytes, filename: str, options: dict) -> Runner:
    """For a backend that loads only files: a copy written from the verified bytes into a private
    (0700) directory, removed when the runner is garbage-collected."""
    private = Path(tempfile.mkdtemp(prefix="dc-bundle-"))
    os.chmod(private, 0o700)
    copy = private / filename
    copy.write_bytes(data)
    try:
        runner = engine.load(copy, **options)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    weakref.finalize(runner, shutil.rmtree, str(private), True)
    return runner

"""Bundle files on the device: sha256 of every file (the manifest's ``files`` table) and atomic writes."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["MANIFEST_NAME", "UnsafeBundleFile", "sha256_file", "bundle_files", "hash_tree", "write_bytes_atomic"]

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class UnsafeBundleFile(ValueError):
    """A bundle entry that is not a regular file inside the bundle (a symbolic link, a device, ...)."""


def bundle_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` (POSIX relative path -> path), walked without following links.

    A symlink anywhere (file or directory) or any other non-regular entry raises :class:`UnsafeBundleFile`
    naming it, before any file is opened: a bundle is exactly the bytes inside its directory.
    ``__pycache__`` folders (written when the device package runs from the bundle) are not bundle files.
    """
    root = Path(root)
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for entry in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / entry
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeBundleFile(f"bundle {str(root)!r}: {rel!r} is a symbolic link; a bundle may hold only regular files "
                                       "(replace the link with the file itself)")
            if entry in filenames and not stat.S_ISREG(st.st_mode):
                raise UnsafeBundleFile(f"bundle {str(root)!r}: {rel!r} is not a regular file")
            if entry in filenames:
                out[rel] = path
    return dict(sorted(out.items()))


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest itself, keyed by POSIX relative path
    (symbolic links refused, see :func:`bundle_files`)."""
    return {rel: sha256_file(p) for rel, p in bundle_files(root).items() if rel != MANIFEST_NAME}


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write next to ``path`` and rename into place: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path

"""Open a bundle only after checking that every file is the one the manifest names."""

from __future__ import annotations

import os
from pathlib import Path

from ..backends.base import Runner
from .atomic import BundleError
from .manifest import Manifest, hash_tree

__all__ = ["verify_bundle", "load_bundle"]


def verify_bundle(root: str | os.PathLike[str]) -> Manifest:
    """Return the manifest if every listed file exists with its sha256 and nothing was added; else raise."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist")
    manifest = Manifest.load(root)
    actual = hash_tree(root)
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
    if manifest.artifact not in manifest.files:
        raise BundleError(f"bundle {str(root)!r}: artifact {manifest.artifact!r} is not among the manifest's files")
    return manifest


def load_bundle(root: str | os.PathLike[str], *, verify: bool = True, **options) -> Runner:
    """Verify the checksums, then load the artifact with the backend that built it."""
    manifest = verify_bundle(root) if verify else Manifest.load(root)
    from ..backends import get_backend

    return get_backend(manifest.backend).load(Path(root) / manifest.artifact, **options)

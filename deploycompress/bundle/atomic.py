"""Write an output directory all at once: a failed build never leaves half a bundle behind."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import InputError

__all__ = ["BundleError", "atomic_output_dir", "check_out_dir"]

log = logging.getLogger(__name__)


class BundleError(InputError, RuntimeError):
    """A bundle that cannot be written or trusted; the message names the file or directory."""


def check_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse a non-empty ``out_dir`` up front (before any long work) unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BundleError(f"output path {str(out_dir)!r} exists and is not a directory")
        if not overwrite and any(out_dir.iterdir()):
            raise BundleError(f"output directory {str(out_dir)!r} is not empty; pass overwrite=True (CLI: --force) or choose another")
    return out_dir


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out_dir``; rename it onto ``out_dir`` only when the block succeeds.

    The staging directory lives in the same parent so the final rename stays on one file system.
    On failure it is removed and an existing ``out_dir`` is left untouched.
    """
    out_dir = check_out_dir(out_dir, overwrite=overwrite).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield staging
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", out_dir)


def _publish(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

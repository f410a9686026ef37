"""One error hierarchy for the whole project.

Every error the project raises derives from :class:`DeployCompressError`, through exactly one of:

* :class:`InputError`: the input is unusable (an argument, a file, a config, a bundle that fails
  verification). The message names what to change. The command line exits with 2.
* :class:`StepError`: a step failed on valid input (export, build, a backend run). The message names
  the step and the cause. The command line exits with 1.

Each concrete class also keeps the builtin base it always had (``ConfigError`` is still a
``ValueError``, ``BackendError`` still a ``RuntimeError``), so ``except ValueError`` in user code
keeps working. :func:`exit_code` maps any exception to the CLI's exit code from this hierarchy alone.

This module imports nothing from the project, so every room may import it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["DeployCompressError", "InputError", "StepError", "MaskError", "exit_code", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "user_stacklevel"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class DeployCompressError(Exception):
    """Root of every error deploycompress raises."""


class InputError(DeployCompressError):
    """Bad input: the message names the argument, file or key to change (CLI exit code 2)."""


class StepError(DeployCompressError):
    """A step failed on valid input: the message names the step and the cause (CLI exit code 1)."""


class MaskError(InputError, ValueError):
    """Masks that do not fit the format, the file or the model: the message names the file,
    module and parameter (one class for the mask files of ``pruning`` and the masks of ``speedup``)."""


def exit_code(exc: BaseException) -> int:
    """2 for an :class:`InputError`, 1 for anything else (a failed step or an unexpected error)."""
    return EXIT_USAGE if isinstance(exc, InputError) else EXIT_FAILURE


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` in the calling function that points the warning at the first
    frame outside this package (the user's line), however deep inside the package the call is made."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    return level

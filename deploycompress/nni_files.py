"""Reading the ``torch.save`` files NNI writes, with ``torch.load(weights_only=True)``.

NNI 3.0 returns its masks (``Compressor.compress()``, built in
nni/compression/pruning/tools/sparse_gen.py ``generate_sparsity``) and its calibration
(nni/compression/base/compressor.py ``get_calibration_config``) as ``collections.defaultdict(dict)``;
users save them with ``torch.save``. PyTorch's weights-only unpickler refuses that global, and even
allow-listed it cannot fill a ``defaultdict`` (its SETITEM accepts only ``dict``, ``OrderedDict`` and
``Counter``). So, scoped to one load, exactly ``collections.defaultdict`` is allowed, as a
constructor of a plain ``dict``; ``builtins.dict`` resolves only to a marker accepted as that
constructor's factory argument (calling it fails). Nothing else is widened.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from .errors import InputError

__all__ = ["NNIFileError", "nni_safe_globals", "load_nni_file"]


class NNIFileError(InputError, ValueError):
    """A file that is not a readable NNI/torch file: the message names the file."""


class _DictFactory:
    """Stands for ``builtins.dict`` during a load: only as a ``defaultdict``'s factory."""

    def __repr__(self) -> str:
        return "dict (as a defaultdict factory)"


_DICT_FACTORY = _DictFactory()


def _defaultdict_as_dict(default_factory: Any = None) -> dict[Any, Any]:
    """``collections.defaultdict(dict)`` as the unpickler rebuilds it: a plain, empty dict."""
    if default_factory is not None and default_factory is not _DICT_FACTORY:
        raise NNIFileError(f"a defaultdict in an NNI file must have the factory dict, got {default_factory!r}")
    return {}


@contextlib.contextmanager
def nni_safe_globals() -> Iterator[None]:
    """Within the context, ``torch.load(weights_only=True)`` reads ``defaultdict(dict)`` as a dict."""
    allowed = [(_defaultdict_as_dict, "collections.defaultdict"), (_DICT_FACTORY, "builtins.dict")]
    with torch.serialization.safe_globals(allowed):  # type: ignore[arg-type]
        yield


def load_nni_file(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` that also reads NNI 3.0's
    ``defaultdict`` files (as plain dicts). Raises :class:`NNIFileError` naming the file."""
    from .checks import load_tensor_file

    return load_tensor_file(path, "", NNIFileError, nni_safe_globals())  # one description of every load failure

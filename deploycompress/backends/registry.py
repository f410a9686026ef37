"""Backends by name: onnxruntime (built in) and TensorRT (its module imports tensorrt lazily)."""

from __future__ import annotations

from typing import Callable

from ..suggest import did_you_mean
from .base import Backend, BackendError, BackendInputError

__all__ = ["BACKENDS", "get_backend", "register_backend"]

_FACTORIES: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _FACTORIES[name] = factory


def _onnxruntime() -> Backend:
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _tensorrt() -> Backend:
    from .tensorrt import TensorRTBackend  # imports tensorrt itself only when an engine is built or loaded

    return TensorRTBackend()


register_backend("onnxruntime", _onnxruntime)
register_backend("tensorrt", _tensorrt)
BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ('onnxruntime', 'tensorrt'); a clear error when it cannot run here."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BackendInputError(f"unknown backend {name!r}{did_you_mean(name, _FACTORIES)}; known backends: {sorted(_FACTORIES)}")
    return factory()

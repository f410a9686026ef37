"""Backends by name. The onnxruntime backend is built in; TensorRT registers itself when it lands."""

from __future__ import annotations

from typing import Callable

from .base import Backend, BackendError, BackendInputError

__all__ = ["BACKENDS", "get_backend", "register_backend"]

_FACTORIES: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _FACTORIES[name] = factory


def _onnxruntime() -> Backend:
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _tensorrt() -> Backend:
    try:
        import tensorrt  # lazy: only this call needs it
    except ImportError:
        tensorrt = None
    if getattr(tensorrt, "Builder", None) is None:  # type stubs alone leave an empty namespace package
        raise BackendError(
            "backend 'tensorrt': TensorRT is not installed here (pip install 'deploycompress[tensorrt]' on a machine "
            "with an NVIDIA GPU); the TensorRT backend itself lands in its own issue, on the same QDQ graph"
        )
    raise BackendError("backend 'tensorrt': TensorRT is installed, but the TensorRT backend is not part of this version yet")


register_backend("onnxruntime", _onnxruntime)
register_backend("tensorrt", _tensorrt)
BACKENDS = ("onnxruntime", "tensorrt")


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ('onnxruntime', 'tensorrt'); a clear error when it cannot run here."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BackendInputError(f"unknown backend {name!r}; known backends: {sorted(_FACTORIES)}")
    return factory()

"""Backends behind one protocol: onnxruntime (embedded default) and TensorRT (lazy import)."""

from .base import Backend, BackendError, BackendInputError, LayerTime, Runner, TensorSpec
from .onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from .registry import BACKENDS, get_backend, register_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendInputError",
    "LayerTime",
    "OnnxRuntimeBackend",
    "OnnxRuntimeRunner",
    "Runner",
    "TensorSpec",
    "get_backend",
    "register_backend",
]

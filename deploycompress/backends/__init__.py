"""Backends behind one protocol: onnxruntime (embedded default) and TensorRT (lazy import)."""

from .base import Backend, BackendError, LayerTime, Runner, TensorSpec

__all__ = ["Backend", "BackendError", "LayerTime", "Runner", "TensorSpec"]

"""The few CUDA runtime calls a TensorRT runner needs (device buffers, copies, a stream, the GPU's name),
through ctypes on ``libcudart`` - the library TensorRT itself links - so the device needs no torch,
pycuda nor cuda-python. Polygraphy's ``polygraphy.cuda`` takes the same approach.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from functools import lru_cache

import numpy as np

__all__ = ["CudaError", "DeviceBuffer", "Stream", "device_info", "memcpy_htod", "memcpy_dtoh"]

_H2D, _D2H = 1, 2
_CC_MAJOR, _CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


class CudaError(RuntimeError):
    """A CUDA runtime call failed or libcudart was not found."""


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    found = ctypes.util.find_library("cudart")
    if found:
        names.insert(0, found)
    for root in sys.path:  # pip's nvidia-cuda-runtime wheels (pulled in by tensorrt's libs packages)
        names += sorted(glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaError(f"libcudart (the CUDA runtime) was not found; tried {names[:6]}...")


def _check(status: int, what: str) -> None:
    if status != 0:
        lib = _lib()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        raise CudaError(f"{what} failed: {lib.cudaGetErrorString(status).decode()} ({status})")


class Stream:
    """A CUDA stream; ``handle`` is what ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        ptr = ctypes.c_void_p()
        _check(_lib().cudaStreamCreate(ctypes.byref(ptr)), "cudaStreamCreate")
        self.handle = int(ptr.value or 0)

    def synchronize(self) -> None:
        _check(_lib().cudaStreamSynchronize(ctypes.c_void_p(self.handle)), "cudaStreamSynchronize")

    def __del__(self) -> None:
        if getattr(self, "handle", 0):
            _lib().cudaStreamDestroy(ctypes.c_void_p(self.handle))
            self.handle = 0


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``; freed with the object."""

    def __init__(self, nbytes: int) -> None:
        ptr = ctypes.c_void_p()
        _check(_lib().cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))), f"cudaMalloc({nbytes})")
        self.ptr = int(ptr.value or 0)
        self.nbytes = int(nbytes)

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _lib().cudaFree(ctypes.c_void_p(self.ptr))
            self.ptr = 0


def memcpy_htod(dst: DeviceBuffer, src: np.ndarray, stream: Stream) -> None:
    src = np.ascontiguousarray(src)
    _check(_lib().cudaMemcpyAsync(ctypes.c_void_p(dst.ptr), ctypes.c_void_p(src.ctypes.data), ctypes.c_size_t(src.nbytes),
                                  _H2D, ctypes.c_void_p(stream.handle)), "cudaMemcpyAsync(host to device)")


def memcpy_dtoh(dst: np.ndarray, src: DeviceBuffer, stream: Stream) -> None:
    if not dst.flags["C_CONTIGUOUS"]:
        raise CudaError("memcpy_dtoh needs a C-contiguous destination")
    _check(_lib().cudaMemcpyAsync(ctypes.c_void_p(dst.ctypes.data), ctypes.c_void_p(src.ptr), ctypes.c_size_t(dst.nbytes),
                                  _D2H, ctypes.c_void_p(stream.handle)), "cudaMemcpyAsync(device to host)")


def device_info(device: int = 0) -> dict[str, str]:
    """{"name": ..., "compute_capability": "8.7"} of ``device``."""
    lib = _lib()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib.cudaDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device), "cudaDeviceGetAttribute")
    _check(lib.cudaDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device), "cudaDeviceGetAttribute")
    props = ctypes.create_string_buffer(16384)  # cudaDeviceProp starts with char name[256]
    getter = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    _check(getter(props, device), "cudaGetDeviceProperties")
    return {"name": props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}

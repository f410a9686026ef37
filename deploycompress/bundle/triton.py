"""A Triton Inference Server model repository: ``<name>/config.pbtxt`` and ``<name>/1/model.<ext>``.

The config is written as protobuf text format by hand (no tritonclient dependency at run time);
the tests parse it against Triton's own ``ModelConfig`` message.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from ..backends.base import TensorSpec
from .atomic import BundleError

__all__ = ["TRITON_PLATFORMS", "check_model_name", "served_max_batch_size", "triton_config", "write_model_repository"]

#: backend name -> (Triton platform, file name inside the version directory, instance kind)
TRITON_PLATFORMS: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx", "KIND_CPU"),
    "tensorrt": ("tensorrt_plan", "model.plan", "KIND_GPU"),
}

_TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_model_name(name: str) -> str:
    """A Triton model name (also a folder name in the repository): letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise BundleError(f"model name {name!r} is not a valid Triton model name (letters, digits, '_', '.', '-'; no path)")
    return name


def _has_dynamic_batch(specs: Sequence[TensorSpec]) -> bool:
    return bool(specs) and all(len(t.shape) > 0 and not isinstance(t.shape[0], int) for t in specs)


def served_max_batch_size(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int) -> int:
    """Triton's ``max_batch_size``: the requested one when every tensor leads with a dynamic axis, else 0."""
    return max_batch_size if max_batch_size > 0 and _has_dynamic_batch(inputs) and _has_dynamic_batch(outputs) else 0


def _tensor_block(kind: str, specs: Sequence[TensorSpec], batched: bool) -> str:
    entries = []
    for t in specs:
        if t.dtype not in _TRITON_DTYPES:
            raise BundleError(f"{kind} {t.name!r}: dtype {t.dtype!r} has no Triton type; known: {sorted(_TRITON_DTYPES)}")
        dims = list(t.shape[1:] if batched else t.shape)
        dims_txt = ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in dims)
        entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {_TRITON_DTYPES[t.dtype]}\n    dims: [ {dims_txt} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def triton_config(
    name: str,
    backend: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 32,
    instance_count: int = 1,
    max_queue_delay_us: int = 100,
) -> str:
    """config.pbtxt text. A leading dynamic axis on every tensor becomes Triton's batch dimension
    (``max_batch_size`` > 0, ``dynamic_batching`` on); a model without one is served unbatched."""
    check_model_name(name)
    if backend not in TRITON_PLATFORMS:
        raise BundleError(f"backend {backend!r} has no Triton platform; known: {sorted(TRITON_PLATFORMS)}")
    platform, _, kind = TRITON_PLATFORMS[backend]
    served = served_max_batch_size(inputs, outputs, max_batch_size)
    batched = served > 0
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {served}"]
    text = "\n".join(lines) + "\n"
    text += _tensor_block("input", inputs, batched)
    text += _tensor_block("output", outputs, batched)
    if batched:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]\n"
    return text


def write_model_repository(
    root: Path,
    name: str,
    backend: str,
    artifact: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    **config_options,
) -> Path:
    """Copy ``artifact`` into ``root/<name>/1/`` and write ``root/<name>/config.pbtxt``; return the copied file."""
    text = triton_config(name, backend, inputs, outputs, **config_options)
    model_dir = Path(root) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    target = version_dir / TRITON_PLATFORMS[backend][1]
    shutil.copyfile(artifact, target)
    return target


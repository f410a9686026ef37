"""The small protocol every backend implements: build an artifact, load it, run it, profile it.

Kept free of any runtime import so the rest of the project (bundles, reports, the CLI) can speak
of backends on a machine that has none of them installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError, StepError

__all__ = ["TensorSpec", "LayerTime", "Runner", "Backend", "BackendError", "BackendInputError"]


class BackendError(StepError, RuntimeError):
    """A backend could not build, load or run an artifact; the message names the step and the file."""


class BackendInputError(InputError, BackendError):
    """A backend was given unusable input (an unknown option, a missing file, a wrong precision):
    still a :class:`BackendError`, but an :class:`InputError` (CLI exit 2)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A dimension is an int, or a string for a dynamic axis ("batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorSpec":
        return cls(name=str(data["name"]), shape=tuple(data["shape"]), dtype=str(data["dtype"]))


@dataclass(frozen=True)
class LayerTime:
    """Time spent in one node/layer of the deployed graph, averaged over the profiled runs."""

    name: str
    op_type: str
    mean_ms: float
    calls: int = 1
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """A loaded artifact ready to run. Feeds and results are numpy arrays keyed by tensor name."""

    backend: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def profile(self, feeds: Mapping[str, np.ndarray], iterations: int = 20) -> list[LayerTime]: ...


@runtime_checkable
class Backend(Protocol):
    """Turns an ONNX file into the backend's artifact (model.onnx, model.plan) and loads it."""

    name: str
    artifact_name: str  # file name inside a bundle: "model.onnx" or "model.plan"

    def build(self, onnx_path: Path, out_dir: Path, *, precision: str = "int8", **options) -> Path: ...

    def load(self, artifact_path: Path, **options) -> Runner: ...

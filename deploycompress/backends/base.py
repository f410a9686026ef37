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
from ..tensor_io import TensorSpec  # defined with the naming convention it carries; named here too

__all__ = ["TensorSpec", "LayerTime", "Runner", "Backend", "BackendError", "BackendInputError", "named_feeds"]


class BackendError(StepError, RuntimeError):
    """A backend could not build, load or run an artifact; the message names the step and the file."""


class BackendInputError(InputError, BackendError):
    """A backend was given unusable input (an unknown option, a missing file, a wrong precision):
    still a :class:`BackendError`, but an :class:`InputError` (CLI exit 2)."""


@dataclass(frozen=True)
class LayerTime:
    """Time spent in one node/layer of the deployed graph, averaged over the profiled runs."""

    name: str
    op_type: str
    mean_ms: float
    calls: int = 1
    extra: dict = field(default_factory=dict)


def named_feeds(feeds: object, inputs: Sequence[TensorSpec], who: str) -> dict[str, np.ndarray]:
    """``feeds`` as a mapping ``{input name: array}``: a mapping as given; one array or tensor (torch
    tensors are detached to numpy) when the graph has exactly one input. Anything else raises
    :class:`BackendInputError` naming the graph's inputs, before any run."""
    names = [s.name for s in inputs]
    if isinstance(feeds, Mapping):
        return {k: _to_numpy(v) for k, v in feeds.items()}
    if len(names) == 1 and (isinstance(feeds, np.ndarray) or hasattr(feeds, "detach")):
        return {names[0]: _to_numpy(feeds)}
    raise BackendInputError(f"{who}: run() takes a dict {{input name: array}} with the inputs {names}"
                            + (" (or one array)" if len(names) == 1 else "") + f", got {type(feeds).__name__}")


def _to_numpy(value: object) -> np.ndarray:
    detach = getattr(value, "detach", None)  # a torch tensor, without importing torch here
    return detach().cpu().numpy() if callable(detach) else np.asarray(value)


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

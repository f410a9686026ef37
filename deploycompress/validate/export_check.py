"""The exported graph checked against PyTorch, not trusted: data-dependent control flow or an
exporter bug shows up as a difference on some input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import StepError

__all__ = ["ExportMismatchError", "check_export"]

log = logging.getLogger(__name__)


class ExportMismatchError(StepError, RuntimeError):
    """The ONNX graph does not compute what the PyTorch model computes; the message names the output."""


def check_export(onnx_path: str | Path, model: Any, feeds: Sequence[Mapping[str, Any]], *, tolerance: float = 1e-3) -> dict[str, float]:
    """Run the float ONNX graph (onnxruntime, CPU) and ``model`` on each of ``feeds`` (input name ->
    tensor); every output must agree within ``tolerance`` relative to its largest magnitude
    (``max|onnx - torch| / max(1, max|torch|)``). Returns output name -> worst relative difference;
    raises :class:`ExportMismatchError` naming the output, the feed and the difference."""
    import torch

    from ..backends import get_backend
    from .validate import _match_outputs, _reference_outputs

    runner = get_backend("onnxruntime").load(Path(onnx_path), threads=1, providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}
    for i, feed in enumerate(feeds):
        arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in feed.items()}
        names = [s.name for s in runner.inputs]
        if sorted(arrays) != sorted(names):
            raise ExportMismatchError(f"feed {i} names inputs {sorted(arrays)}, the graph takes {names}")
        got = runner.run({k: np.ascontiguousarray(arrays[k]) for k in names})
        ref = _match_outputs(runner, _reference_outputs(model, {k: arrays[k] for k in names}, 1 << 30))
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                raise ExportMismatchError(f"output {name!r}: ONNX shape {g.shape} differs from PyTorch {r.shape} on feed {i}")
            diff = float(np.abs(g.astype(np.float64) - r).max(initial=0.0)) / max(1.0, float(np.abs(r).max(initial=0.0)))
            worst[name] = max(worst.get(name, 0.0), diff)
            if not np.isfinite(diff) or diff > tolerance:
                which = "the example inputs" if i == 0 else f"input {i} (from the calibration/evaluation data)"
                raise ExportMismatchError(
                    f"the exported graph differs from PyTorch on output {name!r} for {which}: relative max |diff| {diff:.3g} "
                    f"> {tolerance:g} (data-dependent control flow in forward, or an exporter bug; see the tracer warnings)"
                )
    log.info("export checked on %d input(s): worst relative difference %s", len(feeds), {k: f"{v:.2g}" for k, v in worst.items()})
    return worst

"""Cross-backend comparison through Polygraphy's Comparator, with our runners as Polygraphy runners."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ..backends.base import Runner

__all__ = ["BackendComparison", "compare_backends"]


def _polygraphy_runner(runner: Runner, name: str):
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class _Adapter(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="deploycompress")

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in runner.inputs:
                meta.add(spec.name, dtype=DataType.from_dtype(np.dtype(spec.dtype)), shape=list(spec.shape))
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = OrderedDict(runner.run(feed_dict))
            self.inference_time = time.perf_counter() - start
            return out

        def deactivate_impl(self):
            pass

    return _Adapter()


@dataclass
class BackendComparison:
    passed: bool
    atol: float
    rtol: float
    max_abs_error: dict[str, float] = field(default_factory=dict)  # "a vs b/output" -> max |a - b|

    def to_dict(self) -> dict:
        return asdict(self)


def compare_backends(
    runners: Mapping[str, Runner],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> BackendComparison:
    """Run every runner on every feed with Polygraphy's Comparator and compare each pair of outputs."""
    if len(runners) < 2:
        raise ValueError(f"compare_backends needs at least two runners, got {list(runners)}")
    from polygraphy.comparator import Comparator

    try:
        from polygraphy.comparator import SimpleCompareFunc

        compare_func = SimpleCompareFunc(atol=atol, rtol=rtol)
    except ImportError:  # Polygraphy < 0.50
        from polygraphy.comparator import CompareFunc

        compare_func = CompareFunc.simple(atol=atol, rtol=rtol)

    adapters = [_polygraphy_runner(r, name) for name, r in runners.items()]
    results = Comparator.run(adapters, data_loader=[dict(f) for f in feeds])
    accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)
    errors: dict[str, float] = {}
    per_pair = accuracy if hasattr(accuracy, "items") else accuracy[0]  # AccuracyResults (list) since Polygraphy 0.50
    for (a, b), iterations in per_pair.items():
        for it in iterations:
            for out, res in it.items():
                key = f"{a} vs {b}/{out}"
                errors[key] = max(errors.get(key, 0.0), float(res.max_absdiff))
    return BackendComparison(bool(accuracy), atol, rtol, errors)

"""Where candidate evaluations run: in this process (default) or on Ray (``pip install 'deploycompress[ray]'``).

One small interface, ``executor.map(fn, items, desc=...) -> list`` in the order of ``items``. Each
call ``fn(item)`` runs with the torch and numpy seeds set from ``seed`` and the item's index, so
the in-process and Ray runs of a search return the same results for the same seed.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["Executor", "InProcessExecutor", "RayExecutor", "get_executor"]

log = logging.getLogger(__name__)


@runtime_checkable
class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "candidates") -> list[Any]: ...


def _seeded_call(fn: Callable[[Any], Any], item: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return fn(item)


class InProcessExecutor:
    """Runs every call here, one after another, with a progress bar."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "candidates") -> list[Any]:
        items = list(items)
        return [_seeded_call(fn, x, self.seed + i) for i, x in enumerate(tqdm(items, desc=desc, unit="candidate", leave=False, disable=None))]


class RayExecutor:
    """Runs the calls as Ray tasks: ``address`` joins a cluster (``ray.init(address=...)``);
    without it a local Ray starts with ``num_cpus`` workers; ``runtime_env`` is Ray's (e.g.
    ``{"env_vars": {"PYTHONPATH": ...}}`` so workers import the modules your functions live in). Each task gets ``num_cpus_per_task``
    CPUs and sets torch to that many threads."""

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, seed: int = 0, num_cpus_per_task: int = 1,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        try:
            import ray
        except ImportError as exc:
            raise ImportError("RayExecutor needs Ray: pip install 'deploycompress[ray]'") from exc
        self._ray = ray
        self.seed = seed
        self.num_cpus_per_task = num_cpus_per_task
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env, **kw)
            log.info("ray started (%s)", address or f"local, num_cpus={num_cpus}")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str = "candidates") -> list[Any]:
        ray = self._ray
        threads = self.num_cpus_per_task

        @ray.remote(num_cpus=threads)
        def task(f: Callable[[Any], Any], x: Any, seed: int) -> Any:
            torch.set_num_threads(threads)
            return _seeded_call(f, x, seed)

        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, x, self.seed + i) for i, x in enumerate(items)]
        out: list[Any] = [None] * len(refs)
        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        with tqdm(total=len(refs), desc=desc, unit="candidate", leave=False, disable=None) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for r in done:
                    out[index[r]] = ray.get(r)
                    bar.update(1)
        return out

    def shutdown(self) -> None:
        self._ray.shutdown()


def get_executor(spec: Any = None, seed: int = 0) -> Executor:
    """``None``/``'inprocess'`` -> :class:`InProcessExecutor`; ``'ray'`` -> local :class:`RayExecutor`;
    ``'ray://host:port'`` or ``'auto'`` style addresses join a cluster; an Executor passes through."""
    if spec is None or spec == "inprocess":
        return InProcessExecutor(seed)
    if isinstance(spec, str):
        if spec == "ray":
            return RayExecutor(seed=seed)
        if spec.startswith("ray://"):  # Ray Client
            return RayExecutor(address=spec, seed=seed)
        if spec.startswith("ray:"):
            return RayExecutor(address=spec[len("ray:"):], seed=seed)
        raise ValueError(f"executor must be 'inprocess', 'ray' or 'ray:<address>', got {spec!r}")
    if isinstance(spec, Executor):
        return spec
    raise TypeError(f"executor must be a name or have a map(fn, items) method, got {spec!r}")

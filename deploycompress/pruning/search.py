"""What the automatic pruners share: per-layer sparsities -> masks with a basic pruner, one
candidate's fine-tune + evaluation, the search trajectory and its plot."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ..config import AMOUNT_SPELLINGS, select_modules
from .channel import channel_dim
from .io import Masks, _weight
from .scheduler import PrunerSpec, _pin, _pruner_class, make_basic_pruner, masked_fraction, plain_copy, wrap_masks

log = logging.getLogger(__name__)

__all__ = ["Candidate", "Trajectory", "fit_measured", "layer_masks", "selected_layers", "train_and_score", "trajectory_plot"]


def selected_layers(model: nn.Module, config_list: Sequence[Mapping[str, Any]], spec: PrunerSpec) -> dict[str, int]:
    """Selected layer -> number of output channels."""
    cls = _pruner_class(spec)
    selection = [{k: v for k, v in c.items() if k not in AMOUNT_SPELLINGS} for c in config_list]
    for c in selection:
        if not c.get("exclude"):
            c["sparsity"] = 0.5  # selection only
    chosen = select_modules(model, selection, kind="pruning", default_op_types=cls.default_op_types,
                            supported_op_types=cls.supported_op_types, algorithm=cls.__name__)  # fmt: skip
    modules = dict(model.named_modules())
    out = {}
    for name in chosen:
        w = _weight(modules[name])
        assert w is not None
        out[name] = int(w.shape[channel_dim(modules[name])])
    if not out:
        raise ValueError("the config_list selects no layer")
    return out


def layer_masks(
    spec: PrunerSpec,
    params: Mapping[str, Any] | None,
    model: nn.Module,
    sparsities: Mapping[str, float],
    pinned: Masks | None = None,
    dummy_input: Any = None,
) -> Masks:
    """Masks for ``model`` (not changed) pruning each layer of ``sparsities`` to that fraction of its
    units with the basic pruner ``spec``; units pruned in ``pinned`` stay pruned."""
    work = plain_copy(model)
    config = [{"op_names": [n], "sparsity": float(s)} for n, s in sparsities.items()]
    pruner = make_basic_pruner(spec, work, config, params, dummy_input)
    if pinned:
        _pin(pruner, pinned)
    _, masks = pruner.compress()
    return {n: {p: m.clone() for p, m in e.items()} for n, e in masks.items()}


def train_and_score(
    model: nn.Module, masks: Masks, finetune: Callable[[nn.Module], Any] | None, evaluate: Callable[[nn.Module], float] | None
) -> tuple[nn.Module, float | None]:
    """A copy of ``model`` with ``masks`` applied, fine-tuned if asked; returns (plain copy, score)."""
    work = wrap_masks(plain_copy(model), masks)
    if finetune is not None:
        finetune(work)
    score = evaluate(work) if evaluate is not None else None
    return plain_copy(work), score


def fit_measured(
    model: nn.Module,
    sparsities: Mapping[str, float],
    make_masks: Callable[[nn.Module, dict[str, float]], Masks],
    meter: Any,
    goal: float,
    cap: float,
    max_steps: int = 8,
    dense_value: float | None = None,
    floor: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], Masks, float]:
    """Bring the chosen candidate onto the *measured* budget ``goal``.

    The lookup table's additive estimate is off both ways (optimistic when neighbouring layers are
    both pruned, pessimistic when a width runs faster than its parts suggest), so the candidate is
    measured (as a fraction of ``model``, the dense one, times ``dense_value``: latency is timed
    interleaved with the dense model) and moved along one path: ``c`` in [0, 1] takes every layer
    from ``floor`` (default 0: the dense model) to the chosen sparsity, ``c`` in [1, 2] on to
    ``cap``. Bisection on ``c`` (at most ``max_steps`` measurements after the first) stops once a
    measurement lies within the meter's tolerance of ``goal`` (``goal * (1 - tol) .. goal * (1 + tol)``)
    and returns, of the candidates measured at or under ``goal * (1 + tol)``, the one measured
    closest to ``goal`` (latency is not monotone in the widths).
    Returns (sparsities, masks, measured value); warns with ``BudgetNotReached`` if even ``c = 2``
    measures above the budget."""
    chosen = {n: float(s) for n, s in sparsities.items()}
    low = {n: float((floor or {}).get(n, 0.0)) for n in chosen}
    dense = dense_value if dense_value is not None else meter(model, None)
    tol = float(meter.tolerance or 0.0)

    def at(c: float) -> dict[str, float]:
        if c <= 1.0:
            return {n: low[n] + c * (s - low[n]) for n, s in chosen.items()}
        return {n: s + (c - 1.0) * (max(cap, s) - s) for n, s in chosen.items()}

    def measure(c: float) -> tuple[dict[str, float], Masks, float]:
        sp = at(c)
        masks = make_masks(model, sp)
        value = meter.relative(model, masks, model) * dense
        log.info("fit to the measured budget: c=%.4f, %s %.4g (budget %.4g)", c, meter.metric, value, goal)
        return sp, masks, value

    def near(value: float) -> bool:
        return goal * (1.0 - tol) <= value <= goal * (1.0 + tol)

    first = measure(1.0)
    if near(first[2]):
        return first
    fitting: list[tuple[dict[str, float], Masks, float]] = []  # every candidate measured within the budget
    if meter.within(first[2], goal):
        fitting.append(first)
        lo, hi = 0.0, 1.0  # below the budget by more than the noise: give back some pruning
    else:
        lo, hi = 1.0, 2.0
        top = measure(2.0)
        if not meter.within(top[2], goal):
            from .netadapt import BudgetNotReached

            warnings.warn(f"measured {meter.metric} {top[2]:.4g} stays above the budget {goal:.4g} with every layer at {cap}",
                          BudgetNotReached, stacklevel=3)  # fmt: skip
            return top
        fitting.append(top)
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        trial = measure(mid)
        if meter.within(trial[2], goal):
            fitting.append(trial)
            hi = mid
            if near(trial[2]):
                break
        else:
            lo = mid
    fits = max(fitting, key=lambda f: f[2])  # latency is not monotone in the widths: the closest to the budget
    if not near(fits[2]):
        log.info("fit to the measured budget: %s %.4g after %d steps, not within %.0f %% of %.4g", meter.metric, fits[2], max_steps, 100 * tol, goal)
    return fits


@dataclass
class Candidate:
    """One evaluated point of a search: per-layer sparsities, score, resource (measured or estimated)."""

    step: int
    sparsities: dict[str, float]
    score: float | None
    resource: float
    measured: bool
    accepted: bool = False
    sparsity: float = 0.0  # pruned weight elements / configured weight elements


@dataclass
class Trajectory:
    """The search's history, for reports: every candidate, in order."""

    metric: str
    dense_resource: float
    dense_score: float | None = None
    budget: float | None = None
    candidates: list[Candidate] = field(default_factory=list)

    def add(self, model: nn.Module, masks: Masks, **kw: Any) -> Candidate:
        c = Candidate(len(self.candidates), **kw)
        c.sparsity = masked_fraction(model, masks, list(c.sparsities)) if masks else 0.0
        self.candidates.append(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "candidates"}, "candidates": [asdict(c) for c in self.candidates]}


def trajectory_plot(trajectory: Trajectory, path: Any = None) -> bytes:
    """Score vs resource for every candidate (measured ones filled, accepted ones joined); PNG bytes,
    also written to ``path`` when given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    pts = [c for c in trajectory.candidates if c.score is not None]
    unit = {"latency": "ms", "flops": "MACs", "params": "parameters"}.get(trajectory.metric, "")
    est = [c for c in pts if not c.measured]
    meas = [c for c in pts if c.measured]
    if est:
        ax.scatter([c.resource for c in est], [c.score for c in est], s=14, facecolors="none", edgecolors="#4C72B0", label="candidate (estimated)")
    if meas:
        ax.scatter([c.resource for c in meas], [c.score for c in meas], s=18, color="#4C72B0", label="candidate (measured)")
    acc = [c for c in pts if c.accepted]
    if acc:
        ax.plot([c.resource for c in acc], [c.score for c in acc], "-o", color="#DD8452", ms=4, label="accepted")
    if trajectory.dense_score is not None:
        ax.scatter([trajectory.dense_resource], [trajectory.dense_score], marker="*", s=90, color="black", label="dense")
    if trajectory.budget is not None:
        ax.axvline(trajectory.budget, color="#C44E52", ls="--", lw=1, label="budget")
    ax.set_xlabel(f"{trajectory.metric} ({unit})")
    return figure_png(fig, ax, path, legend_size=8)


def figure_png(fig: Any, ax: Any, path: Any = None, *, legend_size: int = 8, legend_columns: int = 1) -> bytes:
    """The pruning plots' common finish: score axis, grid, legend; PNG bytes, also written
    (atomically) to ``path`` when given."""
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncols=legend_columns)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        _write_bytes(data, path)
    return data


def _write_bytes(data: bytes, path: Any) -> None:
    """Write atomically: a temporary file beside ``path``, then a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

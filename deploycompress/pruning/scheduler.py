"""Scheduled pruning in NNI 2.x's shape: a task generator proposes each round's config_list, a basic
(one-shot) pruner makes the masks, an optional fine-tuner and evaluator run between rounds, and the
scheduler keeps the history and the best result.

Masks always refer to the modules of the model being pruned. Without ``speedup`` every round prunes
the same (masked) model with the *cumulative* sparsity of that round; units pruned in earlier rounds
are pinned (their score is ``-inf``), so masks only grow and each round's per-layer count is exactly
what its config_list asks. With ``speedup=True`` the model is physically shrunk after every round
(``deploycompress.speedup``) and the next round's sparsity is rescaled to the smaller layers: counted
against the original widths, a ``total_sparsity`` budget at the original weight elements of each removed
output channel (:func:`relative_config`, :func:`original_channel_costs`), and channel pruners named by
string or class prune dependency-aware, so coupled channels go together and speedup removes them.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..model_copy import plain_copy as _plain_copy
from ..config import select_modules, validate_config_list
from ..errors import user_stacklevel
from ..suggest import did_you_mean
from .allocate import prune_count
from .base import Pruner, _Mask
from .channel import ChannelPruner, PruningWarning, channel_dim, channel_rows
from .evaluator import TorchEvaluator
from .io import Masks, _param, _weight
from .level import ElementPruner

__all__ = [
    "BASIC_PRUNERS",
    "CompressResult",
    "Task",
    "TaskResult",
    "TaskGenerator",
    "PruningScheduler",
    "make_basic_pruner",
    "channel_sparsity",
    "masked_fraction",
    "original_channel_costs",
    "plain_copy",
    "relative_config",
    "wrap_masks",
]

log = logging.getLogger(__name__)


def _basic_pruners() -> dict[str, type[Pruner]]:
    from .activation import ActivationAPoZRankPruner, ActivationMeanRankPruner
    from .admm import ADMMPruner
    from .level import LevelPruner
    from .norm import FPGMPruner, L1NormPruner, L2NormPruner
    from .slim import SlimPruner
    from .taylor import TaylorFOWeightPruner

    return {
        "level": LevelPruner,
        "l1": L1NormPruner,
        "l2": L2NormPruner,
        "fpgm": FPGMPruner,
        "slim": SlimPruner,
        "apoz": ActivationAPoZRankPruner,
        "mean_activation": ActivationMeanRankPruner,
        "taylorfo": TaylorFOWeightPruner,
        "admm": ADMMPruner,
    }


#: NNI 2.x's ``pruning_algorithm`` names -> one-shot pruner classes
BASIC_PRUNERS: dict[str, type[Pruner]] = _basic_pruners()

PrunerSpec = str | type | Pruner | Callable[[nn.Module, list], Pruner]


def make_basic_pruner(
    spec: PrunerSpec, model: nn.Module, config_list: list[dict[str, Any]], params: Mapping[str, Any] | None = None, dummy_input: Any = None
) -> Pruner:
    """A one-shot pruner for ``model``: ``spec`` is one of :data:`BASIC_PRUNERS`' names (NNI's
    ``pruning_algorithm``), a Pruner class, a factory ``(model, config_list) -> Pruner``, or a
    Pruner instance (re-created on ``model`` with the same settings). ``dummy_input`` goes to a
    pruner that takes one (channel pruners then also mask the parameters joined to pruned
    channels, so speedup removes them) unless ``params`` gives its own."""
    params = dict(params or {})
    if isinstance(spec, type) and not issubclass(spec, Pruner):
        raise TypeError(f"pruning_algorithm {spec.__name__} is not a Pruner class")
    if isinstance(spec, (str, type)):
        cls = _pruner_class(spec)
        if dummy_input is not None and params.get("dummy_input") is None and "dummy_input" in inspect.signature(cls).parameters:
            params["dummy_input"] = dummy_input
        return cls(model, config_list, **params)
    if isinstance(spec, Pruner):
        return _rebind(spec, model, config_list)
    if callable(spec):
        pruner = spec(model, config_list)
        if not isinstance(pruner, Pruner):
            raise TypeError(f"the pruner factory returned {type(pruner).__name__}, not a Pruner")
        return pruner
    raise TypeError(f"pruning_algorithm must be a name, a Pruner class, a factory or a Pruner, got {spec!r}")


def _rebind(pruner: Pruner, model: nn.Module, config_list: list[dict[str, Any]]) -> Pruner:
    """A copy of ``pruner`` (same algorithm arguments) selecting from ``model`` with ``config_list``."""
    clone = copy.copy(pruner)
    clone.__dict__ = {k: v for k, v in pruner.__dict__.items()}
    Pruner.__init__(clone, model, config_list)
    if isinstance(clone, ChannelPruner):
        clone._channel_groups = clone._build_channel_groups() if clone.dependency_aware else []
    for attr in ("_sums", "_counts"):  # statistics collected on the old model
        if attr in clone.__dict__:
            setattr(clone, attr, {})
    return clone


def _pruned_units(module: nn.Module, mask: torch.Tensor, units: int) -> torch.Tensor:
    """Which of ``units`` scored units ``mask`` (a weight mask) has removed entirely: weight elements
    when there is one unit per element, else output channels (or blocks of rows)."""
    if units == mask.numel():
        return ~mask.reshape(-1)
    rows = channel_rows(mask, channel_dim(module))
    return ~rows.reshape(units, -1).any(1)


def _pin(pruner: Pruner, masks: Masks) -> None:
    """Give units already pruned in ``masks`` the score ``-inf``, so this round prunes them again first."""
    score = pruner._score

    def pinned(name: str, module: nn.Module, config: Any) -> torch.Tensor:
        s = score(name, module, config)
        entry = masks.get(name)
        w_attr = next((p for p in (entry or {}) if p.endswith("weight")), None)
        if entry is None or w_attr is None:
            return s
        gone = _pruned_units(module, entry[w_attr], s.numel()).reshape(s.shape)
        return s.masked_fill(gone.to(s.device), float("-inf"))

    pruner._score = pinned  # type: ignore[method-assign]


def wrap_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Put ``masks`` into ``model``'s forward pass in place (the parametrization the pruners use)."""
    modules = dict(model.named_modules())
    for name, entry in masks.items():
        for pname, mask in entry.items():
            if parametrize.is_parametrized(modules[name], pname):
                continue
            param = _param(modules[name], pname)
            assert param is not None, f"{name}.{pname}"
            parametrize.register_parametrization(modules[name], pname, _Mask(mask.to(param.device)), unsafe=True)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without mask parametrizations (pruned weights zero), in the same train/eval mode."""
    return _plain_copy(model, eval_mode=False)


def masked_fraction(model: nn.Module, masks: Masks, names: Sequence[str] | None = None) -> float:
    """Pruned weight elements / all weight elements over ``names`` (default: the masked modules)."""
    modules = dict(model.named_modules())
    pruned = total = 0
    for name in names if names is not None else list(masks):
        w = _weight(modules[name])
        assert w is not None
        total += w.numel()
        entry = masks.get(name, {})
        wm = next((m for p, m in entry.items() if p.endswith("weight")), None)
        if wm is not None:
            pruned += int((~wm).sum())
    return pruned / total if total else 0.0


class CompressResult:
    """What the scheduled and automatic pruners share after ``compress()``: ``masks``,
    ``unwrap_model()`` (a plain copy, pruned weights zero) and ``export_model()``."""

    _result: tuple[nn.Module, Masks] | None = None

    def _compressed(self) -> tuple[nn.Module, Masks]:
        if self._result is None:
            raise RuntimeError(f"{type(self).__name__}: call compress() first")
        return self._result

    @property
    def masks(self) -> Masks:
        return self._compressed()[1]

    def unwrap_model(self) -> nn.Module:
        """The result without the mask parametrizations (pruned weights zero), as a new model."""
        return plain_copy(self._compressed()[0])

    def export_model(self, model_path: Any, mask_path: Any = None) -> None:
        """Save the plain state dict (pruned weights zero) and, with ``mask_path``, the masks."""
        from .io import atomic_torch_save, save_masks

        atomic_torch_save(self.unwrap_model().state_dict(), model_path)
        if mask_path is not None:
            save_masks(self.masks, mask_path)


@dataclass
class Task:
    """One round: the config_list the basic pruner gets, and what happens after it."""

    task_id: int
    config_list: list[dict[str, Any]]
    finetune: bool = True
    evaluate: bool = True
    speedup: bool | None = None  # None: the scheduler's setting
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """What one round produced. ``model`` is kept only for the best result (else None)."""

    task_id: int
    config_list: list[dict[str, Any]]
    masks: Masks
    score: float | None
    sparsity: float  # pruned weight elements / weight elements of the configured layers, vs the original model
    model: nn.Module | None = None
    #: the masks that apply to ``model``: ``masks`` itself, or none once a speedup removed the pruned channels
    model_masks: Masks | None = None
    resources: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class TaskGenerator:
    """Proposes rounds. ``reset(model, config_list)`` starts; ``next_task()`` returns a Task or None
    when done; ``receive(result)`` hears each round's outcome; ``best_result_mode`` is ``'latest'``,
    ``'maximize'`` or ``'minimize'`` (of the evaluator's score)."""

    best_result_mode = "latest"

    def reset(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        self.origin_model = model
        self.origin_config_list = validate_config_list(copy.deepcopy(list(config_list)), kind="pruning")
        self._next_id = 0

    def next_task(self) -> Task | None:
        raise NotImplementedError

    def receive(self, result: TaskResult, model: nn.Module) -> None:
        """Called after every round (before the next ``next_task``) with the plain model the next
        round starts from (pruned weights zero; physically smaller after a speedup)."""

    def total_tasks(self) -> int | None:
        return None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _as_finetune(finetuner: Any, steps: int | None, epochs: int | None) -> Callable[[nn.Module], Any] | None:
    if finetuner is None:
        return None
    if isinstance(finetuner, TorchEvaluator):
        return lambda m: finetuner.train(m, max_steps=steps, max_epochs=epochs if epochs or steps else 1)
    if not callable(finetuner):
        raise TypeError(f"finetuner must be a callable model -> None or a TorchEvaluator, got {finetuner!r}")
    return finetuner


def _as_evaluate(evaluator: Any) -> Callable[[nn.Module], float] | None:
    if evaluator is None:
        return None
    if isinstance(evaluator, TorchEvaluator):
        if evaluator.evaluating_func is None:
            raise ValueError("the TorchEvaluator given as evaluator has no evaluating_func")
        return lambda m: _score_value(evaluator.evaluate(m))
    if not callable(evaluator):
        raise TypeError(f"evaluator must be a callable model -> float or a TorchEvaluator, got {evaluator!r}")
    return lambda m: _score_value(evaluator(m))


def _score_value(value: Any) -> float:
    """NNI evaluators may return a number or ``(score, metrics)`` / ``{'default': score}``."""
    if isinstance(value, tuple):
        value = value[0]
    if isinstance(value, Mapping):
        value = value.get("default", next(iter(value.values())))
    return float(value)


class PruningScheduler:
    """``PruningScheduler(pruner, task_generator, finetuner, speedup, dummy_input, evaluator)``: run
    the generator's rounds; ``compress()`` returns the best ``(model, masks)`` (masks in the
    forward pass, as a one-shot pruner returns them); ``get_best_result()`` gives NNI's tuple
    ``(task_id, model, masks, score, config_list)``; ``history`` every round.

    ``pruner`` is a basic pruner spec (see :func:`make_basic_pruner`) with ``pruning_params``.
    ``finetuner`` is ``model -> None`` or a :class:`TorchEvaluator` (trained ``finetune_epochs``
    epochs or ``finetune_steps`` steps); it runs with the masks applied, so pruned weights stay
    zero. ``evaluator`` is ``model -> float`` (higher is better) or a TorchEvaluator with an
    ``evaluating_func``. ``rewind(model, masks)`` (lottery ticket) runs between pruning and
    fine-tuning. The caller's model is never modified.
    """

    def __init__(
        self,
        pruner: PrunerSpec,
        task_generator: TaskGenerator,
        finetuner: Any = None,
        speedup: bool = False,
        dummy_input: Any = None,
        evaluator: Any = None,
        reset_weight: bool = False,
        *,
        pruning_params: Mapping[str, Any] | None = None,
        finetune_epochs: int | None = None,
        finetune_steps: int | None = None,
        keep_models: bool = False,
    ) -> None:
        if speedup and dummy_input is None:
            raise ValueError("PruningScheduler: speedup=True needs dummy_input (an example input batch)")
        if speedup and issubclass(_pruner_class(pruner), ElementPruner):
            raise ValueError(
                "PruningScheduler: speedup=True with a fine-grained pruner removes nothing (speedup removes whole "
                "channels); use a channel pruner such as 'l1' or set speedup=False"
            )
        self.pruner_spec = pruner
        self.pruning_params = dict(pruning_params or {})
        if speedup:
            _dependency_aware_for_speedup(pruner, self.pruning_params)
        self.task_generator = task_generator
        self.finetune = _as_finetune(finetuner, finetune_steps, finetune_epochs)
        self.evaluate = _as_evaluate(evaluator)
        self.speedup = speedup
        self.dummy_input = dummy_input
        self.reset_weight = reset_weight
        self.keep_models = keep_models
        self.history: list[TaskResult] = []
        self.best: TaskResult | None = None
        self.rewind: Callable[[nn.Module, Masks], None] | None = None

    # ------------------------------------------------------------------ one round
    def run_task(
        self, task: Task, model: nn.Module, pinned: Masks, unit_costs: Mapping[str, int] | None = None
    ) -> tuple[nn.Module, TaskResult]:
        """Prune ``model`` (a plain model, modified in place) by ``task``; return it (masks applied) and the result.
        ``unit_costs`` (weight elements per output channel by layer) is what a ``total_sparsity`` budget counts
        (default: the model's own; after a speedup, the original model's)."""
        pruner = make_basic_pruner(self.pruner_spec, model, task.config_list, self.pruning_params, self.dummy_input)
        pruner.budget_unit_costs = dict(unit_costs or {})
        self._layers = list(pruner.module_configs)
        if pinned:
            _pin(pruner, pinned)
        wrapped, masks = pruner.compress()
        if self.rewind is not None:
            self.rewind(wrapped, masks)
        if task.finetune and self.finetune is not None:
            self.finetune(wrapped)
        score = self.evaluate(wrapped) if task.evaluate and self.evaluate is not None else None
        return wrapped, TaskResult(task.task_id, task.config_list, masks, score, 0.0, state=dict(task.state))

    def _better(self, result: TaskResult) -> bool:
        mode = self.task_generator.best_result_mode
        if self.best is None or mode == "latest":
            return True
        if result.score is None:
            return False
        if self.best.score is None:
            return True
        return result.score > self.best.score if mode == "maximize" else result.score < self.best.score

    # ------------------------------------------------------------------ the loop
    def compress(self, model: nn.Module, config_list: list[dict[str, Any]]) -> tuple[nn.Module, Masks]:
        origin = plain_copy(model)
        gen = self.task_generator
        gen.reset(origin, config_list)
        work = plain_copy(origin)
        pinned: Masks = {}
        names = None
        self.history, self.best = [], None
        bar = tqdm(total=gen.total_tasks(), desc=f"{type(gen).__name__.replace('TaskGenerator', '')} rounds", unit="round", disable=None, leave=False)
        try:
            while (task := gen.next_task()) is not None:
                speed = self.speedup if task.speedup is None else task.speedup
                costs = None
                if speed and self.history:
                    task.config_list = relative_config(task.config_list, origin, work, self.pruner_spec)
                    costs = original_channel_costs(origin, work)
                wrapped, result = self.run_task(task, work, {} if speed else pinned, costs)
                if names is None:
                    names = self._layers  # the configured layers (masks also name joined BatchNorms)
                plain = plain_copy(wrapped)
                result.sparsity = masked_fraction(plain, result.masks, [n for n in names if n in result.masks]) if not speed else 0.0
                if speed:
                    from ..speedup import speedup as _speedup

                    plain = _speedup(plain, result.masks, self.dummy_input)
                    result.model_masks = {}
                    result.sparsity = channel_sparsity(origin, plain, names)
                    pinned = {}
                else:
                    pinned = result.masks
                if self._better(result):
                    result.model = plain_copy(plain)
                    if self.best is not None and not self.keep_models:
                        self.best.model = None
                    self.best = result
                elif self.keep_models:
                    result.model = plain_copy(plain)
                self.history.append(result)
                log.info(
                    "round %d: sparsity %.4f%s", result.task_id, result.sparsity,
                    "" if result.score is None else f", score {result.score:.4f}",
                )  # fmt: skip
                gen.receive(result, plain)
                work = plain
                bar.update(1)
        finally:
            bar.close()
        if self.best is None:
            raise RuntimeError(f"{type(gen).__name__} proposed no round")
        assert self.best.model is not None
        masks = self.best.masks if self.best.model_masks is None else self.best.model_masks
        return wrap_masks(plain_copy(self.best.model), masks), masks

    def get_best_result(self) -> tuple[int, nn.Module, Masks, float | None, list[dict[str, Any]]]:
        if self.best is None or self.best.model is None:
            raise RuntimeError("call compress() first")
        masks = self.best.masks if self.best.model_masks is None else self.best.model_masks
        return self.best.task_id, plain_copy(self.best.model), masks, self.best.score, self.best.config_list


def _dependency_aware_for_speedup(spec: PrunerSpec, params: dict[str, Any]) -> None:
    """Speedup between rounds removes a coupled channel (a residual Add's) only when every layer sharing it
    pruned it; a channel pruner that does not know the groups zeroes such channels in one member, the next
    round ranks the zeroed channels lowest again and a ``total_sparsity`` budget stalls short of its target.
    So a pruner named by class or name prunes dependency-aware unless ``params`` says otherwise (then a
    ``PruningWarning`` names the consequence)."""
    if isinstance(spec, Pruner):
        explicit = not getattr(spec, "dependency_aware", True)
    elif isinstance(spec, (str, type)) and issubclass(cls := _pruner_class(spec), ChannelPruner):
        explicit = params.get("dependency_aware") is False or params.get("mode") == "normal"
        if "dependency_aware" in inspect.signature(cls).parameters and "dependency_aware" not in params and "mode" not in params:
            params["dependency_aware"] = True
            log.info("speedup between rounds: %s prunes dependency-aware (coupled channels together, so speedup removes them)", cls.__name__)
    else:
        return
    if explicit:
        warnings.warn(
            "PruningScheduler: speedup=True with dependency_aware=False: channels coupled across layers (residual adds) "
            "that one layer prunes are zeroed, not removed, and a total_sparsity budget can stop short of its target; "
            "leave dependency_aware at its default (True here) to prune coupled channels together",
            PruningWarning,
            stacklevel=user_stacklevel(),
        )


def _pruner_class(spec: PrunerSpec) -> type[Pruner]:
    if isinstance(spec, str):
        if spec.lower() not in BASIC_PRUNERS:
            raise ValueError(f"pruning_algorithm {spec!r} is unknown{did_you_mean(spec, BASIC_PRUNERS)}; choose one of {sorted(BASIC_PRUNERS)} or pass a Pruner")
        return BASIC_PRUNERS[spec.lower()]
    if isinstance(spec, type):
        return spec
    if isinstance(spec, Pruner):
        return type(spec)
    return Pruner


def relative_config(config_list: list[dict[str, Any]], origin: nn.Module, current: nn.Module, spec: PrunerSpec) -> list[dict[str, Any]]:
    """The config_list for ``current`` (a sped-up ``origin``) that asks what ``config_list`` asks of
    ``origin``, counted against ``origin``:

    * per-layer ``sparsity``: ``floor(sparsity * n_origin)`` pruned output channels in all, so
      ``k - (n_origin - n_current)`` more of the ``n_current`` left (one channel always stays);
    * ``total_sparsity`` (NNI's global allocation): counted as a one-shot prune's masks count it, output
      channels at their original cost ``c_l = W_origin_l / n_origin_l`` (what speedup also drops from a
      downstream layer's inputs is not counted, or a chain of layers would overshoot the budget in the
      first round). Of the budget ``s * W_origin`` the earlier rounds used ``sum_l (n_origin_l -
      n_current_l) * c_l``; the rest is asked of ``current`` as a fraction of ``sum_l n_current_l * c_l``
      (0 when the earlier rounds already removed enough); a ``max_sparsity_per_layer`` cap of ``c``
      becomes, per layer, ``(c * n_origin - (n_origin - n_current)) / n_current`` of the channels left.
    """
    cls = _pruner_class(spec)
    selected = select_modules(
        origin, config_list, kind="pruning", default_op_types=cls.default_op_types,
        supported_op_types=cls.supported_op_types, algorithm=cls.__name__,
    )  # fmt: skip
    org, cur = dict(origin.named_modules()), dict(current.named_modules())

    def channels(name: str) -> tuple[int, int]:
        return _widths(org[name], cur[name])

    out: list[dict[str, Any]] = []
    groups: dict[int, list[str]] = {}
    for name, mc in selected.items():
        if mc.sparsity is None:
            groups.setdefault(mc.config_index, []).append(name)
            continue
        n0, n1 = channels(name)
        k = max(0, prune_count(mc.sparsity, n0, mc.sparse_rounding) - (n0 - n1))
        out.append({"op_names": [name], "sparsity": min(k, n1 - 1) / n1})
    for names in groups.values():
        mc = selected[names[0]]
        assert mc.total_sparsity is not None
        w0 = _weight_total(origin, names)
        left = sum(channels(n)[1] * _channel_cost(org[n]) for n in names)  # channels left, at their original cost
        rel = max(0.0, (mc.total_sparsity - channel_sparsity(origin, current, names)) * w0 / left) if left else 0.0
        entry: dict[str, Any] = {"op_names": list(names), "total_sparsity": min(rel, 1.0 - 1e-9)}
        caps = {n: selected[n].max_sparsity_per_layer for n in names}
        if any(c is not None for c in caps.values()):
            rel_caps = {}
            for n, c in caps.items():
                n0, n1 = channels(n)
                cap = 1.0 if c is None else c
                rel_caps[n] = min(1.0, max(0.0, (cap * n0 - (n0 - n1)) / n1))
            entry["max_sparsity_per_layer"] = rel_caps
        log.info("total_sparsity %.4f of the original layers -> %.4f of the channels left", mc.total_sparsity, rel)
        out.append(entry)
    return out


def original_channel_costs(origin: nn.Module, current: nn.Module) -> dict[str, int]:
    """Weight elements per output channel in ``origin`` of every layer ``current`` (a sped-up ``origin``) has
    with a weight: what a later round's ``total_sparsity`` budget counts a channel of ``current`` at, so
    its ranking spends the budget that :func:`relative_config` asks in the same unit (a channel of a shrunk
    layer would otherwise look cheaper than its share of the original budget)."""
    org = dict(origin.named_modules())
    costs = {}
    for name, module in current.named_modules():
        if name in org and _weight(module) is not None and _weight(org[name]) is not None:
            costs[name] = _channel_cost(org[name])
    return costs


def _channel_cost(module: nn.Module) -> int:
    """Weight elements per output channel (what one pruned channel's mask zeroes)."""
    w = _weight(module)
    assert w is not None
    return w.numel() // int(w.shape[channel_dim(module)])


def channel_sparsity(origin: nn.Module, current: nn.Module, names: Sequence[str]) -> float:
    """The fraction of ``origin``'s weight elements in ``names`` that a one-shot prune's masks would zero to
    leave ``current``'s output channels: ``sum_l (n_origin_l - n_current_l) * c_l / W_origin`` with ``c_l`` the
    original weight elements per channel (NNI's ``total_sparsity`` count; inputs speedup dropped are not counted)."""
    org, cur = dict(origin.named_modules()), dict(current.named_modules())
    w0 = _weight_total(origin, names)
    pruned = 0
    for n in names:
        n0, n1 = _widths(org[n], cur[n])
        pruned += (n0 - n1) * _channel_cost(org[n])
    return pruned / w0 if w0 else 0.0


def _widths(origin: nn.Module, current: nn.Module) -> tuple[int, int]:
    """Output channels of one layer in the original and in the sped-up model."""
    dim = channel_dim(origin)
    w0, w1 = _weight(origin), _weight(current)
    assert w0 is not None and w1 is not None
    return int(w0.shape[dim]), int(w1.shape[dim])


def _weight_total(model: nn.Module, names: Sequence[str] | None) -> int:
    modules = dict(model.named_modules())
    total = 0
    for name in names or []:
        w = _weight(modules[name]) if name in modules else None
        total += 0 if w is None else w.numel()
    return total


def iter_history(results: Sequence[TaskResult]) -> Iterator[dict[str, Any]]:
    """The history as plain rows (for reports and JSON)."""
    for r in results:
        yield {"task_id": r.task_id, "sparsity": r.sparsity, "score": r.score, **r.resources}

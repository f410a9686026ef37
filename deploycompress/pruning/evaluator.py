"""Running the user's training code for a pruner, in the shape of NNI 3.0's ``TorchEvaluator``.

Pruners that score channels by activations or gradients need data flowing through the model; Slim
needs a regularised training run. The evaluator holds the user's training function, optimizer and
loss step, so a pruner can run them with hooks installed, a loss term added, or a step limit.
A plain iterable of input batches is accepted where forward passes are enough.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import call_with_batch

__all__ = ["TorchEvaluator", "run_forward", "run_for_statistics"]

log = logging.getLogger(__name__)

_MISSING = object()


class _StepLimitReached(Exception):
    """Raised from the patched training step once ``max_steps`` steps have run."""


@dataclass
class TorchEvaluator:
    """NNI 3.0's evaluator: ``training_func(model, optimizers, training_step, lr_schedulers,
    max_steps, max_epochs)`` trains; ``training_step(batch, model) -> loss`` is one step's loss.

    ``optimizers`` is an optimizer (or a list) over the model's parameters, or a factory
    ``params -> optimizer``. Masks keep the parameter objects, so one optimizer serves before and
    after ``compress()``.
    """

    training_func: Callable[..., Any]
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]
    training_step: Callable[[Any, nn.Module], torch.Tensor]
    lr_schedulers: Any = None
    dummy_input: Any = None
    evaluating_func: Callable[[nn.Module], Any] | None = None
    _bound: tuple[nn.Module, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for field_name in ("training_func", "training_step"):
            if not callable(getattr(self, field_name)):
                raise TypeError(f"TorchEvaluator: {field_name} must be callable, got {getattr(self, field_name)!r}")

    def _optimizers(self, model: nn.Module) -> Any:
        """The optimizer(s) for ``model``; a factory is called once per model, so every run (and
        the step patching in :meth:`measuring`) sees the same optimizer."""
        opts = self.optimizers
        if isinstance(opts, torch.optim.Optimizer) or isinstance(opts, (list, tuple)):
            return opts
        if not callable(opts):
            raise TypeError(f"TorchEvaluator: optimizers must be an optimizer, a list of them or a factory, got {opts!r}")
        if self._bound is None or self._bound[0] is not model:
            self._bound = (model, opts(model.parameters()))
        return self._bound[1]

    def train(
        self,
        model: nn.Module,
        *,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        loss_patch: Callable[[nn.Module], torch.Tensor] | None = None,
    ) -> int:
        """Run the user's training; ``loss_patch(model)`` is added to every step's loss.
        Stops after ``max_steps`` steps even if the training function ignores the limit.
        Returns the number of steps run."""
        steps = 0

        def step(batch: Any, m: nn.Module) -> torch.Tensor:
            nonlocal steps
            if max_steps is not None and steps >= max_steps:
                raise _StepLimitReached
            steps += 1
            loss = self.training_step(batch, m)
            return loss + loss_patch(m) if loss_patch is not None else loss

        try:
            self.training_func(model, self._optimizers(model), step, self.lr_schedulers, max_steps, max_epochs)
        except _StepLimitReached:
            pass
        log.debug("evaluator ran %d training steps", steps)
        return steps

    @contextmanager
    def measuring(self, model: nn.Module) -> Iterator[None]:
        """Optimizer steps do nothing, and model, optimizer and scheduler states come back
        afterwards: running the training code only measures the model."""
        opts = self._optimizers(model)
        opt_list = [opts] if isinstance(opts, torch.optim.Optimizer) else list(opts)
        scheds = self.lr_schedulers
        sched_list = [] if scheds is None else list(scheds) if isinstance(scheds, (list, tuple)) else [scheds]
        model_state = copy.deepcopy(model.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in opt_list]
        sched_states = [copy.deepcopy(s.state_dict()) for s in sched_list]
        saved_steps = [o.__dict__.get("step", _MISSING) for o in opt_list]
        for o in opt_list:
            o.step = lambda *a, **k: None  # type: ignore[method-assign]
        try:
            yield
        finally:
            for o, saved in zip(opt_list, saved_steps):
                if saved is _MISSING:
                    del o.step
                else:
                    o.step = saved  # type: ignore[method-assign]
            model.load_state_dict(model_state)
            for o, state in zip(opt_list, opt_states):
                o.load_state_dict(state)
            for s, state in zip(sched_list, sched_states):
                s.load_state_dict(state)

    def evaluate(self, model: nn.Module) -> Any:
        if self.evaluating_func is None:
            raise RuntimeError("TorchEvaluator.evaluate: no evaluating_func was given")
        return self.evaluating_func(model)


_call = call_with_batch  # the project's one way to call a model with a batch (deploycompress.batches)


@torch.no_grad()
def run_forward(model: nn.Module, batches: Iterable[Any], max_steps: int | None = None) -> int:
    """Forward passes in eval mode over ``batches`` (each item is what the model is called with)."""
    was_training = model.training
    model.eval()
    steps = 0
    try:
        for batch in tqdm(batches, desc="collecting", total=max_steps, leave=False, disable=None):
            if max_steps is not None and steps >= max_steps:
                break
            call_with_batch(model, batch, steps)
            steps += 1
    finally:
        model.train(was_training)
    return steps


def run_for_statistics(model: nn.Module, source: TorchEvaluator | Iterable[Any], max_steps: int | None) -> int:
    """Run data through ``model`` while a pruner's hooks listen; leaves the model unchanged."""
    if isinstance(source, TorchEvaluator):
        with source.measuring(model):
            steps = source.train(model, max_steps=max_steps, max_epochs=None if max_steps else 1)
    else:
        steps = run_forward(model, source, max_steps)
    if steps == 0:
        raise RuntimeError(
            "no batch reached the model while collecting statistics "
            "(an empty iterable, or a generator that was already used up?)"
        )
    return steps

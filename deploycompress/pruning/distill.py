"""Recovering accuracy without labels: the pruned student learns the dense teacher's outputs.

Knowledge distillation on outputs (Hinton et al., 2015, "Distilling the Knowledge in a Neural
Network"; for sentence embedders, Reimers & Gurevych, 2020, "Making Monolingual Sentence Embeddings
Multilingual using Knowledge Distillation": MSE or cosine between student and teacher embeddings) on
unlabelled real inputs, optionally with intermediate-layer matching: the student's named submodules'
outputs (e.g. every transformer layer's hidden states) learn the teacher's by MSE, as in TinyBERT
(Jiao et al., 2020, hidden-state loss) and MiniLM (Wang et al., 2020, layer-wise transfer). Typical flow: prune heads/FFN channels -> ``speedup`` (a physically smaller
model; no masks left to re-grow) -> :func:`distill` -> quantize.

For :class:`~deploycompress.pruning.MovementPruner` (which trains through a ``TorchEvaluator``),
:func:`distillation_evaluator` builds the evaluator whose training step is the distillation loss.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..batches import batch_list
from .evaluator import TorchEvaluator, _call  # one way to call a model with a batch

log = logging.getLogger(__name__)

LOSSES = ("cosine", "mse", "kl")
SCHEDULES = ("constant", "linear")

__all__ = ["DistillResult", "distill", "distillation_evaluator", "distillation_loss"]


@dataclass
class DistillResult:
    """Losses per step (the first and the mean of the last tenth make the summary)."""

    steps: int
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def _tensor(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):  # a Hugging Face ModelOutput
        return out.last_hidden_state
    raise TypeError(f"{where} returned {type(out).__name__}; distillation needs a tensor (wrap it, e.g. deploycompress.hf.Encoder)")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, every submodule's own training flag back afterwards (``train(was)``
    would flip a wrapped Hugging Face model, left in eval mode under a wrapper in training mode, to training)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, loss: str = "cosine", temperature: float = 1.0) -> torch.Tensor:
    """``"cosine"``: mean of 1 - cos over the rows of the last axis; ``"mse"``: mean squared error; ``"kl"``:
    Hinton et al.'s ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the last axis (logits),
    mean over the rows, ``T = temperature``. Shapes must match (batch, ..., features)."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student output {tuple(student_out.shape)} and teacher output {tuple(teacher_out.shape)} differ in shape")
    if loss == "cosine":
        return (1 - F.cosine_similarity(student_out, teacher_out.detach(), dim=-1)).mean()
    if loss == "mse":
        return F.mse_loss(student_out, teacher_out.detach())
    if loss == "kl":
        t = float(temperature)
        log_p = F.log_softmax(student_out / t, dim=-1).flatten(0, -2)
        log_q = F.log_softmax(teacher_out.detach() / t, dim=-1).flatten(0, -2)
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _float(t: torch.Tensor) -> torch.Tensor:
    """A reduced-precision floating tensor (an autocast output) as float32; others as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _first_tensor(out: Any) -> Any:
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


class _Taps:
    """Forward hooks keeping the latest output of named submodules (the first element of a tuple output)."""

    def __init__(self, model: nn.Module, names: Sequence[str], whose: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"{whose} has no submodule {missing[0]!r} (hidden layers are named as in named_modules())")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = _tensor(_first_tensor(output), f"submodule {name!r}")

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _hidden_pairs(hidden: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``{student submodule: teacher submodule}``; a plain list names the same submodule in both."""
    if hidden is None:
        return {}
    if isinstance(hidden, str):
        raise TypeError("hidden must be a list of submodule names or a {student name: teacher name} dict, not a str")
    return dict(hidden) if isinstance(hidden, Mapping) else {n: n for n in hidden}


def distillation_step(
    teacher: nn.Module,
    loss: str = "cosine",
    *,
    hidden: Sequence[str] | Mapping[str, str] | None = None,
    hidden_weight: float = 1.0,
    student: nn.Module | None = None,
    temperature: float = 1.0,
    extra_loss: Callable[[Any], torch.Tensor] | None = None,
    extra_weight: float = 1.0,
    autocast: torch.dtype | None = None,
) -> Callable[[Any, nn.Module], torch.Tensor]:
    """``training_step(batch, student) -> loss`` against ``teacher`` (run in eval mode, without grads).

    With ``hidden`` (submodule names; a dict maps student names to teacher names) the loss adds
    ``hidden_weight`` x the mean over those submodules of the MSE between their outputs (same shapes
    needed: e.g. each encoder layer's hidden states, which head/FFN pruning leaves at full width);
    ``student`` is then required to place the hooks (they stay for the life of the step function).
    ``extra_loss(batch)``, called after both models ran on ``batch``, adds ``extra_weight`` x its value (a term
    that reads its own hooks, e.g. :class:`deploycompress.hf.distill_losses.AttentionRelationLoss`).
    ``autocast`` (e.g. ``torch.bfloat16``): the student's forward pass runs under ``torch.autocast`` of the
    student's device type at that dtype (mixed precision; the weights and optimiser stay float32); the teacher
    runs in full precision and every loss is computed in float32 from the student's outputs.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    pairs = _hidden_pairs(hidden)
    if pairs and student is None:
        raise ValueError("hidden-state matching needs the student module (distillation_step(..., student=model))")
    if hidden_weight < 0:
        raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}")
    if extra_weight < 0:
        raise ValueError(f"extra_weight must be >= 0, got {extra_weight}")
    s_taps = _Taps(student, list(pairs), "the student") if pairs else None
    t_taps = _Taps(teacher, list(pairs.values()), "the teacher") if pairs else None

    def step(batch: Any, model: nn.Module) -> torch.Tensor:
        with eval_mode(teacher), torch.no_grad():
            target = _tensor(_call(teacher, batch), "the teacher")
        if autocast is None:
            out = _tensor(_call(model, batch), "the student")
        else:
            device = next(model.parameters()).device.type
            with torch.autocast(device, dtype=autocast):
                out = _tensor(_call(model, batch), "the student")
        value = distillation_loss(_float(out), target, loss, temperature)
        if s_taps is not None and t_taps is not None:
            if model is not student:
                raise ValueError("this step's hidden-state hooks sit on another student module")
            terms = [
                distillation_loss(_float(s_taps.outputs[s]), t_taps.outputs[t], "mse") for s, t in pairs.items()
            ]  # fmt: skip
            value = value + hidden_weight * sum(terms) / len(terms)
        if extra_loss is not None and extra_weight:
            extra = extra_loss(batch)
            if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
                raise ValueError(f"extra_loss must return a one-element tensor (a loss), got {type(extra).__name__} "
                                 f"{tuple(getattr(extra, 'shape', ()))}: reduce it (e.g. .mean())")
            if value.requires_grad and not extra.requires_grad:  # a constant: it would train nothing, silently
                raise ValueError("extra_loss returned a tensor without gradient (computed under no_grad, detached, or from outputs of a "
                                 "model other than the student being trained): it would add a constant and train nothing")
            value = value + extra_weight * extra.reshape(())
        return value

    step.remove_hooks = lambda: [t.remove() for t in (s_taps, t_taps) if t is not None]  # type: ignore[attr-defined]
    return step


def _schedule(opt: torch.optim.Optimizer, name: str, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``"constant"``; ``"linear"``: linear warm-up over the first 6% of steps, then linear decay to zero
    (BERT's fine-tuning schedule, Devlin et al., 2019)."""
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    warm = max(1, round(0.06 * steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any] | Iterable[Any],
    *,
    steps: int = 300,
    lr: float = 5e-5,
    loss: str = "cosine",
    hidden: Sequence[str] | Mapping[str, str] | None = None,
    hidden_weight: float = 1.0,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    train_mode: bool = True,
    temperature: float = 1.0,
    extra_loss: Callable[[Any], torch.Tensor] | None = None,
    extra_weight: float = 1.0,
    autocast: torch.dtype | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> DistillResult:
    """Fine-tune ``student`` in place to match ``teacher``'s outputs on ``batches`` (cycled for ``steps``).

    ``batches``: input batches as the models take them (a tensor, a tuple of positional inputs, or a
    dict of keyword inputs); both models return a tensor (or a Hugging Face output, whose
    ``last_hidden_state`` is used) of the same shape. ``hidden``: submodule names (or a
    ``{student name: teacher name}`` dict) whose outputs are matched too, by MSE weighted
    ``hidden_weight`` (see :func:`distillation_step`; for a Hugging Face encoder wrapped in
    ``Encoder``: ``[f"model.encoder.layer.{i}" for i in range(n)]``). AdamW with ``lr`` and
    ``weight_decay``, ``schedule`` ``"constant"`` or ``"linear"`` (warm-up then decay to zero), gradient
    norm clipped to ``grad_clip``. The teacher is not changed (eval mode, no grads); the student is
    left in eval mode. Raises ``ValueError`` on bad arguments before training.

    ``train_mode=False`` keeps the student in eval mode while its weights learn: BatchNorm uses (and
    keeps) its running statistics, dropout and stochastic depth stay off. Use it for small batches or
    batches of correlated inputs (e.g. crops of one photo), whose batch statistics would otherwise
    normalise each step and overwrite the running statistics the deployed model uses.

    ``loss="kl"`` distils logits by Hinton et al.'s softened KL at ``temperature``. ``batches`` may be a
    lazy ``Sequence`` (``__len__`` + ``__getitem__``, e.g. fresh random crops per index): batch ``i % len``
    is fetched at step ``i`` and not kept.

    ``extra_loss``/``extra_weight``: a further term computed from the batch after both forward passes
    (:func:`distillation_step`), e.g. MiniLMv2's attention relations
    (:class:`deploycompress.hf.distill_losses.AttentionRelationLoss`). ``autocast``: mixed precision for the
    student's forward pass (``torch.bfloat16`` on a CPU with AVX512-BF16 or AMX: fewer seconds per step), see
    :func:`distillation_step`. ``on_step(i, student)`` is called after optimiser step ``i`` (0-based), e.g. to
    measure the student on held-out data every N steps (wrap such a measurement in :func:`eval_mode`).
    """
    _check_callables(student, extra_loss, extra_weight, on_step)
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student is teacher:
        raise ValueError("student and teacher are the same module: distil a copy (e.g. the sped-up model)")
    batches = batch_list(batches, "batches") if not isinstance(batches, Sequence) or isinstance(batches, tuple) else batches
    if not batches:
        raise ValueError("batches is empty: give at least one batch of real inputs")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _schedule(opt, schedule, steps)
    step_fn = distillation_step(teacher, loss, hidden=hidden, hidden_weight=hidden_weight, student=student, temperature=temperature,
                                extra_loss=extra_loss, extra_weight=extra_weight, autocast=autocast)
    result = DistillResult(steps)
    buffers = {k: v.detach().clone() for k, v in student.named_buffers()}  # put back if the first step fails
    student.train(train_mode)
    try:
        for i in tqdm(range(steps), desc="distill", disable=not progress):
            batch = batches[i % len(batches)]
            try:
                value = step_fn(batch, student)
            except Exception:
                if i == 0:  # nothing learnt yet: BatchNorm statistics as the caller gave them
                    with torch.no_grad():
                        for k, v in student.named_buffers():
                            v.copy_(buffers[k])
                raise
            opt.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            result.losses.append(float(value.detach()))
            if on_step is not None:
                on_step(i, student)
    finally:
        step_fn.remove_hooks()  # type: ignore[attr-defined]
        student.eval()
    log.info("distill: %d steps, loss %.4g -> %.4g", steps, result.first_loss, result.last_loss)
    return result


def _takes(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn`` can be called with ``args`` (True when its signature cannot be read)."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        return False
    except ValueError:  # builtins without a readable signature
        return True
    return True


def _check_callables(student: nn.Module, extra_loss: Any, extra_weight: Any, on_step: Any) -> None:
    """``distill``'s hooks refused before any work: not callables, callables of another arity, a weight that is no
    number or is given without its loss (it used to be ignored; a bad ``on_step`` failed after the first step)."""
    for name, fn, args, form in (("extra_loss", extra_loss, (None,), "extra_loss(batch) -> scalar tensor"),
                                 ("on_step", on_step, (0, student), "on_step(step, student)")):
        if fn is None:
            continue
        if not callable(fn):
            raise ValueError(f"{name} must be a callable {form}, got {type(fn).__name__}")
        if not _takes(fn, *args):
            raise ValueError(f"{name} must be callable as {form}; {getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)} is not")
    if isinstance(extra_weight, bool) or not isinstance(extra_weight, (int, float)):
        raise ValueError(f"extra_weight must be a number, got {extra_weight!r}")
    if extra_loss is None and extra_weight not in (0, 1.0):  # 0: "no extra term", as a disabled loss passes it
        raise ValueError(f"extra_weight={extra_weight} given without extra_loss: pass the loss it weighs")


def distillation_evaluator(
    teacher: nn.Module, batches: Sequence[Any], *, lr: float = 5e-5, loss: str = "cosine", dummy_input: Any = None
) -> TorchEvaluator:
    """A ``TorchEvaluator`` (e.g. for ``MovementPruner``) whose training step is the distillation loss
    against ``teacher`` on ``batches``, with AdamW(``lr``) over the student's parameters."""
    step = distillation_step(teacher, loss)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):  # noqa: ANN001, ANN202
        opt = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        total = max_steps if max_steps is not None else len(batches) * (max_epochs or 1)
        model.train()
        for _, batch in zip(range(total), itertools.cycle(batches)):
            value = training_step(batch, model)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        model.eval()

    return TorchEvaluator(training_func, lambda params: torch.optim.AdamW(params, lr=lr), step, dummy_input=dummy_input)

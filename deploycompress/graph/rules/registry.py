"""The per-op rule registry of the channel trace.

A rule follows one torch call through the channels: it reads the channel ids and zero flags of the
call's inputs (``Call.before``) and records those of its outputs on the tracer, coupling ids (union),
pinning ids that no smaller model can reproduce, or recording per-channel parameters. Adding an op is
adding one function::

    @rule("add", "sub")
    def binary(tracer: Tracer, call: Call) -> None: ...

in the spirit of onnx-graphsurgeon's ``Graph.register`` and Torch-Pruning's per-type pruner registry.
A *pre-rule* runs before the call itself (it may look at parameters before the op reads them).
A call without a rule pins the channels of its traced inputs (:func:`unknown`) and is named in
``ChannelTrace.unknown_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from ..channels import TensorInfo

if TYPE_CHECKING:
    from ..trace import Tracer

__all__ = ["Call", "Rule", "arg", "lookup", "pre_rules", "rule", "pre_rule", "tensors", "unknown"]


@dataclass
class Call:
    """One traced torch call: the function, its name, arguments, result and the inputs' channel records.

    ``before`` maps ``id(tensor)`` of every traced input to its :class:`TensorInfo` as it was before
    the call ran (an in-place op overwrites the record of its input).
    """

    func: Callable
    name: str
    args: tuple
    kwargs: dict
    out: Any
    before: dict[int, TensorInfo | None]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        return arg(self.args, self.kwargs, index, name, default)

    def maybe_info(self, index: int = 0) -> TensorInfo | None:
        """The channel record of positional argument ``index`` before the call (None: untraced)."""
        return self.before.get(id(self.args[index])) if len(self.args) > index else None

    def input_info(self, index: int = 0) -> TensorInfo:
        """Like :meth:`maybe_info`; an untraced argument raises ``LookupError`` (the call then pins, as unknown)."""
        info = self.maybe_info(index)
        if info is None:
            raise LookupError(f"{self.name}: argument {index} carries no channel record")
        return info


Rule = Callable[["Tracer", Call], None]
PreRule = Callable[["Tracer", str, tuple, dict], None]
_RULES: dict[str, Rule] = {}
_PRE_RULES: dict[str, PreRule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the channel rule of the torch ops called ``names`` (``func.__name__``)."""

    def register(fn: Rule) -> Rule:
        for n in names:
            if n in _RULES and _RULES[n] is not fn:
                raise ValueError(f"op {n!r} already has the channel rule {_RULES[n].__name__}")
            _RULES[n] = fn
        return fn

    return register


def pre_rule(*names: str) -> Callable[[PreRule], PreRule]:
    """Register ``fn(tracer, name, args, kwargs)`` to run before the torch ops ``names`` execute."""

    def register(fn: PreRule) -> PreRule:
        for n in names:
            _PRE_RULES[n] = fn
        return fn

    return register


def lookup(name: str) -> Rule:
    """The rule of op ``name``; :func:`unknown` when none is registered."""
    return _RULES.get(name, unknown)


def pre_rules(name: str) -> PreRule | None:
    return _PRE_RULES.get(name)


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def unknown(tracer: "Tracer", call: Call) -> None:
    """No rule (or a rule that cannot follow this call): pin every traced input, outputs are constants.

    A call whose traced inputs carry no channel ids (token ids, attention masks: RoBERTa's position ids are
    ``cumsum`` of ``input_ids.ne(pad).int()``) cannot move channels: its outputs are constants, not named."""
    if all(info is None or not bool((info.ids >= 0).any()) for info in call.before.values()):
        return tracer.mark_outputs(call.out, lambda t: TensorInfo.const(t.shape))
    tracer.trace.unknown_ops.add(call.name)
    for info in call.before.values():
        tracer.pin(info, f"op {call.name!r} has no channel rule")
    tracer.mark_outputs(call.out, lambda t: TensorInfo.const(t.shape))

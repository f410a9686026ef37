"""A private, plain copy of the caller's model: the one way the project takes a model apart.

Pruners wrap weights in torch parametrizations (mask wrappers); ``torch.nn.utils.parametrize``
implements them by swapping each wrapped module's class for a generated subclass. A deep copy shares
that generated class with the caller's module, so ``remove_parametrizations`` on the copy edits the
caller's class too (the caller's ``model(x)`` then raises AttributeError). :func:`plain_copy` never
calls it: each copied module gets its original class back and its parametrized tensors as plain
parameters (or buffers) holding their current, masked values.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["plain_copy", "strip_parametrizations"]


def strip_parametrizations(model: nn.Module) -> nn.Module:
    """Replace every parametrization in ``model`` (in place) by a plain tensor holding its current value.

    Only ``model``'s own module objects are touched: classes are reassigned, never edited, so a model
    that shares classes with ``model`` (the original of a deep copy) keeps working. Returns ``model``.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        plists = module.parametrizations  # type: ignore[union-attr]
        values = {}
        for pname in list(plists.keys()):  # type: ignore[union-attr]
            original = getattr(plists[pname], "original", None)
            is_param = original is None or isinstance(original, nn.Parameter)
            requires_grad = bool(getattr(original, "requires_grad", True))
            values[pname] = (getattr(module, pname).detach().clone(), is_param, requires_grad)
        base = type(module).__bases__[0]  # parametrize generated type(f"Parametrized{cls}", (cls,), ...)
        module.__class__ = base
        del module._modules["parametrizations"]
        for pname, (value, is_param, requires_grad) in values.items():
            if is_param:
                module._parameters[pname] = nn.Parameter(value, requires_grad=requires_grad)
            else:
                module._buffers[pname] = value
    return model


def plain_copy(model: nn.Module, *, eval_mode: bool = True) -> nn.Module:
    """A deep copy of ``model`` without parametrizations (masked values kept), in eval mode by default.

    The caller's model, its classes and its tensors are left exactly as they were.
    """
    work = copy.deepcopy(model)
    strip_parametrizations(work)
    return work.eval() if eval_mode else work

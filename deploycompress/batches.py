"""Calling a model with one item of the user's data, written once.

An item is what the model is called with: a tensor (``model(x)``), a tuple or list of positional inputs
(``model(*item)``) or a dict keyed by forward's parameter names (``model(**item)``). Pruners' statistics,
PTQ calibration and distillation all call through :func:`call_with_batch`, so a DataLoader of
``(input, target)`` pairs gets the same message everywhere.

This module imports nothing from the project, so every room may import it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["batch_list", "call_with_batch", "PAIRS_HINT"]

PAIRS_HINT = ("Each item of the data is what the model is called with; for (input, target) pairs pass "
              "(x for x, _ in loader), or use a TorchEvaluator")


def batch_list(batches: Any, what: str = "batches") -> list:
    """``batches`` (a list, generator or DataLoader of items) as a list, read once. A single tensor or numpy array, a
    single dict or a torch ``Dataset`` is refused with a ``ValueError`` naming the fix: iterating it would feed one
    sample at a time without its batch axis, or the dict's keys. A tuple of tensors (or arrays) is refused too: it
    could be one batch of several inputs or several batches of one, and guessing would be silent when wrong."""
    if _is_array(batches):  # a torch.Tensor or a numpy array (nothing is imported here)
        kind = "tensor" if hasattr(batches, "dim") else "numpy array"
        fix = f"list({what}.split(32))" if hasattr(batches, "dim") else f"list(torch.from_numpy({what}).split(32))"
        raise ValueError(f"{what} is a single {kind} {tuple(batches.shape)}; pass a list of batches, e.g. {fix}")
    if isinstance(batches, Mapping):
        raise ValueError(f"{what} is one dict (keys {list(batches)[:3]}); pass a list of batches, e.g. [{what}]")
    if isinstance(batches, tuple) and batches and all(_is_array(b) for b in batches):
        raise ValueError(f"{what} is a tuple of {len(batches)} tensors, which reads as {len(batches)} batches of one input "
                         f"each but looks like one batch of {len(batches)} inputs (e.g. (input_ids, attention_mask)); "
                         f"pass [{what}] for one batch of several inputs, or a list for several batches")
    if any(c.__name__ == "Dataset" and c.__module__.startswith("torch.utils.data") for c in type(batches).__mro__):
        raise ValueError(f"{what} is a {type(batches).__name__}, whose items are single samples (no batch axis); "
                         f"pass DataLoader({what}, batch_size=32) (of the inputs only, no labels)")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"{what} must be an iterable of input batches (tensors, tuples or dicts of tensors), got {type(batches).__name__}")
    return list(batches)


def _is_array(x: Any) -> bool:
    """A torch.Tensor or a numpy array (duck-typed: this module imports nothing)."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")


def call_with_batch(model: Any, batch: Any, index: int = 0) -> Any:
    """``model`` called with ``batch``; a TypeError on the first tuple/list batch (the usual sign of
    ``(input, target)`` pairs) is raised again with :data:`PAIRS_HINT`."""
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except TypeError as exc:
        if index or not isinstance(batch, (tuple, list)):
            raise
        raise TypeError(f"calling the model with batch {index} (a {type(batch).__name__} of {len(batch)}) failed: {exc}. "
                        f"{PAIRS_HINT}") from exc

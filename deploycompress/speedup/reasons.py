"""Why a masked output channel stays: the reason recorded by the trace rule that pinned its class,
an unmasked partner it is coupled with, the non-zero constant a consumer reads, or decide_removals'
keep-back (round_to, balances, at least one channel per layer)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..graph import ChannelTrace
from .resolve import Removal

__all__ = ["constant_sources", "kept_reasons", "kept_tensor_masks"]


def constant_sources(trace: ChannelTrace, model: nn.Module) -> dict[int, str]:
    """Class root -> a per-channel tensor (``module.attr``) that is non-zero on that class in ``model``.

    Call before shrinking: a BatchNorm bias, a running mean or a position embedding that keeps a
    masked channel non-zero.
    """
    roots = trace.roots()
    modules = dict(model.named_modules(remove_duplicate=False))
    found: dict[int, str] = {}
    # scales (a norm's weight) make nothing non-zero on their own: name the additive constants first
    ordered = sorted(trace.params.items(), key=lambda kv: kv[0][1] in ("weight", "running_var"))
    for (mname, attr), sl in ordered:
        if attr == "running_var":
            continue  # a variance is never zero and never makes a channel non-zero on its own
        t = getattr(modules[mname], attr, None)
        if not isinstance(t, torch.Tensor) or t.dim() <= sl.axis or t.shape[sl.axis] != sl.ids.numel():
            continue
        nonzero = (t.detach() != 0).movedim(sl.axis, 0).reshape(sl.ids.numel(), -1).any(1).cpu()
        ids = sl.ids[nonzero & (sl.ids >= 0)]
        for r in roots[ids].unique().tolist():
            found.setdefault(int(r), f"{mname}.{attr}" if mname else attr)
    return found


def _first(pairs: list[tuple[torch.Tensor, str]], roots: torch.Tensor) -> dict[int, str]:
    out: dict[int, str] = {}
    for ids, reason in pairs:
        ids = ids[ids >= 0]
        if ids.numel():
            for r in roots[ids].unique().tolist():
                out.setdefault(int(r), reason)
    return out


def _count_reasons(
    ids: torch.Tensor, roots: torch.Tensor, name: str, pinned: Mapping[int, str], live: Mapping[int, str],
    unmasked: Mapping[int, set[str]], constants: Mapping[int, str], removal: Removal,
) -> dict[str, int]:
    """Reason -> how many of the channels ``ids`` (masked in ``name``, kept by speedup) stay for it."""
    counts: dict[str, int] = {}
    coupled: set[str] = set()  # one reason for every channel kept by a partner, naming the partners once
    n_coupled = 0
    for i in ids.tolist():
        r = int(roots[i])
        partners = sorted(unmasked.get(r, set()) - {name})
        if r in pinned:
            why = pinned[r]
        elif partners:
            coupled.update(partners)
            n_coupled += 1
            continue
        elif r in live and r in constants:
            why = f"not zero in the masked model ({constants[r]} is non-zero there), {live[r]}"
        elif r in live:
            why = live[r]
        elif r in removal.held:
            why = removal.held[r]
        else:
            why = "kept by the channel analysis"
        counts[why] = counts.get(why, 0) + 1
    if coupled:
        names = sorted(coupled)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        counts[f"coupled with unmasked channels of {', '.join(map(repr, names[:3]))}{more}"] = n_coupled
    return counts


def _unmasked_producers(trace: ChannelTrace, masked: Mapping[str, torch.Tensor | None], roots: torch.Tensor) -> dict[int, set[str]]:
    unmasked: dict[int, set[str]] = {}
    for name, rec in trace.producers.items():
        m = masked.get(name)
        ids = rec.out_ids if m is None or m.numel() != rec.out_ids.numel() else rec.out_ids[~m]
        for r in roots[ids].unique().tolist():
            unmasked.setdefault(int(r), set()).add(name)
    return unmasked


def kept_tensor_masks(
    trace: ChannelTrace, removal: Removal, masks: Mapping[str, Mapping[str, torch.Tensor]],
    masked: Mapping[str, torch.Tensor | None], constants: Mapping[int, str],
) -> dict[str, dict[str, int]]:
    """Per masked per-channel tensor that is no layer's weight (a norm's weight or bias, an embedding's columns,
    a layer scale): ``"module.attr"`` -> reason -> number of its wholly masked channels that stay (zeroed).

    ``masks``: the checked bool masks; a channel counts when every entry of its slice is masked and no layer's
    masked output channel of the same class is reported already (:func:`kept_reasons`)."""
    roots = trace.roots()
    pinned = _first(list(zip(trace.pinned, trace.pin_reasons)), roots)
    live = _first(list(zip(trace.live, trace.live_reasons)), roots)
    unmasked = _unmasked_producers(trace, masked, roots)
    said = torch.zeros(len(roots), dtype=torch.bool)  # classes a layer's masked rows already report
    for name, rec in trace.producers.items():
        m = masked.get(name)
        if m is not None and m.numel() == rec.out_ids.numel():
            said[roots[rec.out_ids[m]]] = True
    slices = [(mname, attr, sl.axis, sl.ids) for (mname, attr), sl in trace.params.items()]
    slices += [(mname, attr, 0, ids) for mname, ids in trace.widened_norms.items() for attr in ("weight", "bias")]
    result: dict[str, dict[str, int]] = {}
    for mname, attr, axis, ids in slices:
        m = masks.get(mname, {}).get(attr)
        if m is None or m.dim() <= axis or m.shape[axis] != ids.numel():
            continue
        gone = ~m.movedim(axis, 0).reshape(ids.numel(), -1).any(1) & (ids >= 0)
        if not bool(gone.any()):
            continue
        stays = ids[gone][removal.keep(ids[gone])]
        stays = stays[~said[roots[stays]]]
        counts = _count_reasons(stays, roots, mname, pinned, live, unmasked, constants, removal)
        if counts:
            result[f"{mname}.{attr}"] = counts
    return result


def kept_reasons(
    trace: ChannelTrace, removal: Removal, masked: Mapping[str, torch.Tensor | None], constants: Mapping[int, str]
) -> dict[str, dict[str, int]]:
    """Per producer: reason -> number of its masked output channels that stay."""
    roots = trace.roots()
    pinned = _first(list(zip(trace.pinned, trace.pin_reasons)), roots)
    live = _first(list(zip(trace.live, trace.live_reasons)), roots)
    unmasked = _unmasked_producers(trace, masked, roots)
    result: dict[str, dict[str, int]] = {}
    for name, rec in trace.producers.items():
        m = masked.get(name)
        if m is None or m.numel() != rec.out_ids.numel():
            continue
        counts = _count_reasons(rec.out_ids[m & removal.keep(rec.out_ids)], roots, name, pinned, live, unmasked, constants, removal)
        if counts:
            result[name] = counts
    return result

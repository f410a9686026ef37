"""Why a masked output channel stays: the reason recorded by the trace rule that pinned its class,
an unmasked partner it is coupled with, the non-zero constant a consumer reads, or decide_removals'
keep-back (round_to, balances, at least one channel per layer)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..graph import ChannelTrace
from .resolve import Removal

__all__ = ["constant_sources", "kept_reasons"]


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


def kept_reasons(
    trace: ChannelTrace, removal: Removal, masked: Mapping[str, torch.Tensor | None], constants: Mapping[int, str]
) -> dict[str, dict[str, int]]:
    """Per producer: reason -> number of its masked output channels that stay."""
    roots = trace.roots()
    pinned = _first(list(zip(trace.pinned, trace.pin_reasons)), roots)
    live = _first(list(zip(trace.live, trace.live_reasons)), roots)
    unmasked: dict[int, set[str]] = {}
    for name, rec in trace.producers.items():
        m = masked.get(name)
        ids = rec.out_ids if m is None or m.numel() != rec.out_ids.numel() else rec.out_ids[~m]
        for r in roots[ids].unique().tolist():
            unmasked.setdefault(int(r), set()).add(name)
    result: dict[str, dict[str, int]] = {}
    for name, rec in trace.producers.items():
        m = masked.get(name)
        if m is None or m.numel() != rec.out_ids.numel():
            continue
        stays = m & removal.keep(rec.out_ids)
        counts: dict[str, int] = {}
        coupled: set[str] = set()  # one reason for every channel kept by a partner, naming the partners once
        n_coupled = 0
        for i in torch.nonzero(stays).flatten().tolist():
            r = int(roots[rec.out_ids[i]])
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
        if counts:
            result[name] = counts
    return result

"""Which channel classes speedup removes: the masks' wish, cut back to what stays consistent."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..graph import ChannelTrace

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """Per channel id: removed or not; ``notes`` say where masks could not be honoured."""

    removed: torch.Tensor
    notes: list[str] = field(default_factory=list)
    held: dict[int, str] = field(default_factory=dict)  # class root -> why decide_removals kept it back
    norms_exact: list[str] = field(default_factory=list)  # set by shrink_model: norms narrowed exactly (speedup.norms)

    def keep(self, ids: torch.Tensor) -> torch.Tensor:
        """Keep flags for a vector of ids (constants, id < 0, are always kept)."""
        return (ids < 0) | ~self.removed[ids.clamp(min=0)]


class _Classes:
    def __init__(self, trace: ChannelTrace) -> None:
        self.roots = trace.roots()
        self.held: dict[int, str] = {}
        self.removable = ~trace.blocked_roots(self.roots, live=True)  # indexed by root

    def removed(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & self.removable[self.roots[ids.clamp(min=0)]]

    def raise_kept(self, ids: torch.Tensor, target: int, reason: str) -> bool:
        """Keep removed classes of ``ids`` in index order until at least ``target`` entries stay."""
        changed = False
        for i in torch.nonzero(self.removed(ids)).flatten().tolist():
            if int((~self.removed(ids)).sum()) >= target:
                break
            root = int(self.roots[ids[i]])
            self.removable[root] = False
            self.held.setdefault(root, reason)
            changed = True
        return changed


def decide_removals(trace: ChannelTrace, round_to: int = 1) -> Removal:
    """Remove every channel class that no consumer reads while non-zero and nothing pins.

    Then keep classes back, conservatively, until every producer keeps at least one channel and a
    multiple of ``round_to`` (or all), and every grouped conv or chunk keeps equal counts per piece.
    """
    classes = _Classes(trace)
    notes: list[str] = []
    producers = sorted(trace.producers.values(), key=lambda r: r.order)
    changed = True
    while changed:
        changed = False
        for rec in producers:
            n = rec.out_ids.numel()
            kept = int((~classes.removed(rec.out_ids)).sum())
            target = max(kept, 0 if rec.name in trace.may_vanish else 1)
            if round_to > 1 and target % round_to:
                target = min(n, math.ceil(target / round_to) * round_to)
            why = f"{rec.name!r} keeps at least one channel" if kept == 0 else f"round_to={round_to} for {rec.name!r}"
            if target > kept and classes.raise_kept(rec.out_ids, target, why):
                if kept == 0:
                    notes.append(f"{rec.name}: every output channel is masked; keeping {target} so the layer still exists")
                changed = True
        for reason, pieces in trace.balances:
            kept = [int((~classes.removed(p)).sum()) for p in pieces]
            target = max(max(kept), 1)
            for p, k in zip(pieces, kept):
                if k < target and classes.raise_kept(p, target, f"{reason}: pieces must keep equal counts"):
                    changed = True
            if min(kept) < target:
                notes.append(f"{reason}: pieces lost unequal channel counts {[p.numel() - k for p, k in zip(pieces, kept)]}; kept more")
    removed = classes.removable[classes.roots] if len(classes.roots) else torch.zeros(0, dtype=torch.bool)
    return Removal(removed, notes, classes.held)

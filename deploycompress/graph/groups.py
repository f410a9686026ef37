"""Channel groups: the producers whose output channels must be pruned together."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .trace import ChannelTrace, trace_channels

log = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """Conv/Linear/ConvTranspose modules whose output channel i is kept or removed together.

    ``groups`` > 1 when a grouped convolution reads (or is one of) these channels: they fall in
    ``groups`` equal contiguous chunks and pruning must remove the same count from each chunk.
    ``pinned`` is True when speedup can never remove these channels (they reach the model output, a
    LayerNorm, attention or an op without a channel rule), so pruning them only zeroes weights.
    """

    modules: list[str]
    num_channels: int
    groups: int = 1
    pinned: bool = False


def _components(trace: ChannelTrace, roots: torch.Tensor) -> list[list[str]]:
    """Producers connected through any shared channel class, in trace order."""
    owner: dict[int, str] = {}
    parent = {name: name for name in trace.producers}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for name, rec in trace.producers.items():
        for r in roots[rec.out_ids].unique().tolist():
            other = owner.setdefault(r, name)
            if other != name:
                parent[find(name)] = find(other)
    comps: dict[str, list[str]] = {}
    for name in sorted(trace.producers, key=lambda n: trace.producers[n].order):
        comps.setdefault(find(name), []).append(name)
    return list(comps.values())


def groups_from_trace(trace: ChannelTrace) -> list[ChannelGroup]:
    roots = trace.roots()
    blocked = trace.blocked_roots(roots, live=False)[roots]
    # grouped-conv chunk counts keyed by the exact class sequence they split
    chunking: dict[tuple[int, ...], list[int]] = {}
    for reason, pieces in trace.balances:
        key = tuple(roots[torch.cat(pieces)].tolist()) if all((p >= 0).all() for p in pieces) else None
        if key is not None:
            chunking.setdefault(key, []).append(len(pieces))
    result: list[ChannelGroup] = []
    for comp in _components(trace, roots):
        recs = [trace.producers[n] for n in comp]
        seqs = [roots[r.out_ids] for r in recs]
        aligned = len({s.numel() for s in seqs}) == 1 and all(torch.equal(s, seqs[0]) for s in seqs[1:])
        members = [comp] if aligned else [[n] for n in comp]
        if not aligned:
            log.debug("producers %s share channels in a permuted or partial way; grouped one by one", comp)
        for names in members:
            seq = roots[trace.producers[names[0]].out_ids]
            g = math.lcm(*chunking.get(tuple(seq.tolist()), [1]))
            pinned = bool(blocked[trace.producers[names[0]].out_ids].all())
            result.append(ChannelGroup(list(names), int(seq.numel()), g, pinned))
    return result


def build_channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """Trace ``model`` on ``example_inputs`` and return every traced producer in exactly one group.

    Producers that the example forward pass never calls (aux heads in eval mode, the out-projection
    inside ``nn.MultiheadAttention``) are not listed: no smaller model can be built for them.
    """
    return groups_from_trace(trace_channels(model, example_inputs))

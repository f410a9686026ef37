"""Channel groups: the producers whose output channels must be pruned together."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .trace import ChannelTrace, trace_channels

log = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """Conv/Linear/ConvTranspose modules whose output channels are coupled.

    The coupled channels fall into ``num_slots`` classes (*slots*): ``slots[m][c]`` is the slot of
    output channel c of member m. Speedup can remove a slot only when every channel in it, in every
    member, is pruned, so pruning takes whole slots. In an *aligned* group (residual adds) every
    member has ``num_channels`` channels and ``slots[m] == arange(num_channels)``: channel i of every
    member is kept or removed together. Other groups are permuted or partial: ShuffleNetV2 stages
    (chunk, cat and channel shuffle), a depthwise conv with multiplier k (one slot = one input channel
    and its k output channels), attention heads (one slot = all q/k/v channels of a head).

    ``balances`` lists pieces of slot indices (with repeats: one entry per channel) that must lose
    equal counts: chunk/split pieces and the filter groups of a grouped conv. ``groups`` > 1 says
    the same for the common case of an aligned group read by a grouped conv: ``groups`` equal
    contiguous chunks. ``pinned`` is True when speedup can never remove these channels (they reach
    the model output, a LayerNorm, attention or an op without a channel rule), so pruning them only
    zeroes weights; ``norm_pinned`` says a norm pins them only under ``norm_spans='keep'`` (speedup with
    ``norm_spans='prune'`` can remove them). ``num_channels`` is the first member's width. ``followers`` are the members whose output
    channels are their own input channels passed on (a depthwise conv): a zero input channel makes their output
    channel removable too, so the others' masks suffice; every other member adds its own values to the channels.
    """

    modules: list[str]
    num_channels: int
    groups: int = 1
    pinned: bool = False
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    num_slots: int = 0
    balances: list[list[torch.Tensor]] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)
    norm_pinned: bool = False

    def __post_init__(self) -> None:
        """A group built the old way (modules, num_channels, groups) is aligned: fill in its slots."""
        if not self.slots:
            self.slots = {m: torch.arange(self.num_channels) for m in self.modules}
            self.num_slots = self.num_channels
            if self.groups > 1 and not self.balances:
                self.balances = [list(torch.arange(self.num_channels).chunk(self.groups))]

    @property
    def aligned(self) -> bool:
        """Every member's channel i is slot i (and no slot repeats)."""
        ref = torch.arange(self.num_channels)
        return all(torch.equal(s, ref) for s in self.slots.values()) and self.num_slots == self.num_channels


class _Components:
    """Union-find over producer names."""

    def __init__(self, names: list[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, names: list[str]) -> None:
        for n in names[1:]:
            a, b = self.find(names[0]), self.find(n)
            if a != b:
                self.parent[b] = a


def _components(trace: ChannelTrace, roots: torch.Tensor, balances: list[torch.Tensor]) -> tuple[list[list[str]], dict[int, str]]:
    """Producers connected through a shared channel class or a balance spanning their classes, in
    trace order; and the first producer owning each class root."""
    owners: dict[int, list[str]] = {}
    for name, rec in trace.producers.items():
        for r in roots[rec.out_ids].unique().tolist():
            owners.setdefault(r, []).append(name)
    comps = _Components(list(trace.producers))
    for names in owners.values():
        comps.union(names)
    for classes in balances:
        comps.union([owners[r][0] for r in classes.tolist() if r in owners])
    by_root: dict[str, list[str]] = {}
    for name in sorted(trace.producers, key=lambda n: trace.producers[n].order):
        by_root.setdefault(comps.find(name), []).append(name)
    return list(by_root.values()), {r: names[0] for r, names in owners.items()}


def _group(trace: ChannelTrace, comp: list[str], roots: torch.Tensor, balances: list[list[torch.Tensor]],
           chunking: dict[tuple[int, ...], list[int]], blocked: torch.Tensor, blocked_not_by_norms: torch.Tensor) -> ChannelGroup:  # fmt: skip
    """Slots numbered by first appearance in trace order, so an aligned group's slots are arange."""
    seqs = {n: roots[trace.producers[n].out_ids] for n in comp}
    slot_of: dict[int, int] = {}
    for seq in seqs.values():
        for r in seq.tolist():
            slot_of.setdefault(r, len(slot_of))
    slots = {n: torch.tensor([slot_of[r] for r in seq.tolist()], dtype=torch.long) for n, seq in seqs.items()}
    pieces = [[torch.tensor([slot_of[r] for r in p.tolist()], dtype=torch.long) for p in b] for b in balances]
    first = seqs[comp[0]]
    g = math.lcm(*chunking.get(tuple(first.tolist()), [1]))
    pinned = all(bool(blocked[trace.producers[n].out_ids].all()) for n in comp)
    followers = [n for n in comp if _passes_on_its_input(trace.producers[n], roots)]
    norm_pinned = pinned and not all(bool(blocked_not_by_norms[trace.producers[n].out_ids].all()) for n in comp)
    group = ChannelGroup(list(comp), int(first.numel()), g, pinned, slots, len(slot_of), pieces, followers, norm_pinned)
    if len(comp) > 1 and not group.aligned:
        log.debug("producers %s share %d channel classes in a permuted or partial way", comp, group.num_slots)
    return group


def _passes_on_its_input(rec: Any, roots: torch.Tensor) -> bool:
    """Whether every output channel class of a producer is one of its input channel classes (a depthwise conv)."""
    ins = rec.in_ids[rec.in_ids >= 0]
    return bool(ins.numel()) and set(roots[rec.out_ids].tolist()) <= set(roots[ins].tolist())


def groups_from_trace(trace: ChannelTrace) -> list[ChannelGroup]:
    roots = trace.roots()
    blocked = trace.blocked_roots(roots, live=False)[roots]
    # the pins a norm makes only under norm_spans='keep' (ChannelTrace.pin_by_norm) do not count here
    other_pins = torch.zeros(len(roots), dtype=torch.bool)
    for ids, by_norm in zip(trace.pinned, trace.pin_by_norm):
        if not by_norm and ids.numel():
            other_pins[roots[ids]] = True
    blocked_not_by_norms = other_pins[roots]
    # balance pieces as class roots of their real (non-constant) channels
    balances = [[roots[p[p >= 0]] for p in pieces] for _, pieces in trace.balances]
    balances = [b for b in balances if any(p.numel() for p in b)]
    # grouped-conv chunk counts keyed by the exact class sequence they split (the aligned case)
    chunking: dict[tuple[int, ...], list[int]] = {}
    for _, pieces in trace.balances:
        if all((p >= 0).all() for p in pieces):
            chunking.setdefault(tuple(roots[torch.cat(pieces)].tolist()), []).append(len(pieces))
    comps, owner = _components(trace, roots, [torch.cat(b) for b in balances])
    index = {name: i for i, comp in enumerate(comps) for name in comp}
    per_comp: list[list[list[torch.Tensor]]] = [[] for _ in comps]
    for b in balances:
        per_comp[index[owner[int(torch.cat(b)[0])]]].append(b)
    return [_group(trace, comp, roots, per_comp[i], chunking, blocked, blocked_not_by_norms) for i, comp in enumerate(comps)]


def build_channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """Trace ``model`` on ``example_inputs`` and return every traced producer in exactly one group.

    Producers that the example forward pass never calls (aux heads in eval mode) are not listed: no
    smaller model can be built for them. Attention projections are listed; a head is one slot.
    """
    return groups_from_trace(trace_channels(model, example_inputs))

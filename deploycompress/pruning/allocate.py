"""Turning scores into how many units (weights or channels) each layer loses, and which.

Shared by every pruner: a pruner only scores its units; these functions decide the counts for a
per-layer ``sparsity`` or a global ``total_sparsity`` budget and pick the lowest-scored units.
Units with the lowest score are pruned; ties go to the lower index, so results are reproducible.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["prune_count", "global_prune_counts", "CoupledUnits", "lowest", "lowest_slots", "UnreachableSparsityWarning"]

_EPS = 1e-6


class UnreachableSparsityWarning(UserWarning):
    """A ``total_sparsity`` budget the per-layer caps cannot meet; the message gives the reachable figure."""


def prune_count(sparsity: float, n: int, rounding: str = "floor") -> int:
    """``floor(sparsity * n)`` (tolerant of float noise such as 0.29 * 100), always keeping one unit.

    ``rounding="nni"`` gives NNI's count, ``int(n * sparsity)`` (nni/compression/pruning/tools/sparse_gen.py
    ``_ratio_mask``), float noise included: 0.29 of 100 channels prunes 28 there.
    """
    raw = int(n * sparsity) if rounding == "nni" else math.floor(sparsity * n + _EPS)
    return max(0, min(n - 1, raw))


@dataclass
class CoupledUnits:
    """Layers whose units a global budget ranks and counts as one: slot ``s`` holds ``sizes[i, s]`` units
    of ``names[i]`` and scores ``scores[s]`` (e.g. the summed channel scores of a residual group), so taking
    it costs ``sum_i sizes[i, s] * unit_cost[names[i]]`` weight elements."""

    names: list[str]
    scores: torch.Tensor  # [slots]
    sizes: torch.Tensor  # [len(names), slots], integer
    #: pieces of slot indices that must lose equal counts (``ChannelGroup.balances``): a candidate is then a
    #: move of :func:`lowest_slots` (a slot with the slots that keep every piece even), scored by its first slot
    balances: Sequence[Sequence[torch.Tensor]] = ()
    #: False: speedup can remove none of these slots (they reach the model output or an op without a channel
    #: rule, or are added to a layer outside the selection), so the budget takes none of them; the layers still
    #: count in its total
    removable: bool = True


def global_prune_counts(
    scores: Mapping[str, torch.Tensor],
    unit_costs: Mapping[str, int],
    total_sparsity: float,
    max_sparsity_per_layer: float | Mapping[str, float | None] | None = None,
    rounding: str = "floor",
    coupled: Sequence[CoupledUnits] = (),
) -> dict[str, int]:
    """One budget for all layers: prune the globally lowest-scored units until ``total_sparsity``
    of all weight elements is gone.

    ``unit_costs[name]`` is how many weight elements one unit of that layer holds (1 for
    fine-grained pruning, the elements of a filter for channel pruning): the budget counts weights,
    as NNI's global allocator does. Each layer offers at most its ``max_sparsity_per_layer`` share
    (one value for all layers, or one per layer name), and keeps one unit.

    Layers named in ``coupled`` are ranked by slot instead (:class:`CoupledUnits`): a slot (with its balancing
    partners, as :func:`lowest_slots` takes it) is one candidate at the summed cost of its units, taken whole
    while every member stays within its cap, so the counts returned for coupled layers are exactly what
    :func:`lowest_slots` then selects, in whole slots (what speedup can remove); a block that is not
    ``removable`` offers none.
    """
    names = list(scores)
    total = sum(scores[n].numel() * unit_costs[n] for n in names)
    budget = int(total * total_sparsity) if rounding == "nni" else math.floor(total_sparsity * total + _EPS)
    caps = {}
    for name in names:
        cap_ratio = max_sparsity_per_layer.get(name) if isinstance(max_sparsity_per_layer, Mapping) else max_sparsity_per_layer
        caps[name] = prune_count(cap_ratio if cap_ratio is not None else 1.0, scores[name].numel())
    block_of = {n: b for b, c in enumerate(coupled) for n in c.names}
    # one block per lone layer (its units, lowest first) or per CoupledUnits (its moves, in the order taken)
    blocks: list[tuple[list[str], torch.Tensor | None]] = []  # (names, units per member and candidate; None: one each)
    cand_scores, cand_costs, cand_block = [], [], []
    done: set[int] = set()
    for name in names:
        b = block_of.get(name)
        if b is None:
            flat = scores[name].detach().reshape(-1).float().cpu()
            blocks.append(([name], None))
            cand_scores.append(torch.sort(flat, stable=True).values[: caps[name]])
            cand_costs.append(torch.full((caps[name],), float(unit_costs[name]), dtype=torch.float64))
        elif b not in done:
            done.add(b)
            c = coupled[b]
            flat, sizes = c.scores.detach().reshape(-1).float().cpu(), c.sizes.long().cpu()
            moves = _slot_moves(flat, sizes, [caps[n] for n in c.names], c.balances) if c.removable else []
            contrib = torch.stack([sizes[:, m].sum(1) for m in moves], 1) if moves else torch.zeros(len(c.names), 0, dtype=torch.long)
            blocks.append((list(c.names), contrib))
            cand_scores.append(flat[[m[0] for m in moves]] if moves else torch.zeros(0))
            member_costs = torch.tensor([float(unit_costs[n]) for n in c.names], dtype=torch.float64)
            cand_costs.append((contrib.double() * member_costs[:, None]).sum(0))
        else:
            continue
        cand_block.append(torch.full((cand_scores[-1].numel(),), len(blocks) - 1, dtype=torch.long))
    order = torch.sort(torch.cat(cand_scores), stable=True).indices
    costs = torch.cat(cand_costs)[order]
    spent = torch.cumsum(costs, 0)
    n_taken = int((spent <= budget + _EPS).sum())
    taken_block = torch.cat(cand_block)[order][:n_taken]
    counts = {name: 0 for name in names}
    for b, k in enumerate(torch.bincount(taken_block, minlength=len(blocks)).tolist()):
        members, contrib = blocks[b]
        for i, n in enumerate(members):
            counts[n] = k if contrib is None else int(contrib[i, :k].sum())
    reached = float(spent[n_taken - 1]) if n_taken else 0.0
    if n_taken == len(order) and budget - reached >= min(unit_costs[n] for n in names):  # every candidate taken, budget left
        warnings.warn(
            f"total_sparsity {total_sparsity} is not reachable: the per-layer caps (max_sparsity_per_layer, and one unit kept in "
            f"every layer) allow at most {reached / total:.4f} of the {total} weights of {names}; lower total_sparsity or raise the caps",
            UnreachableSparsityWarning, stacklevel=3)
    return counts


def lowest(scores: torch.Tensor, k: int, groups: int = 1, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` lowest-scored units (True = prune), skipping ``exclude``.

    With ``groups > 1`` the units form ``groups`` equal contiguous chunks (the filter groups of a
    grouped conv that consumes them) and each chunk loses ``k // groups`` units, so the consumer
    stays evenly grouped.
    """
    flat = scores.detach().reshape(-1).float().clone()
    n = flat.numel()
    if n % groups:
        raise ValueError(f"{n} channels do not split into {groups} equal groups")
    if groups > 1:
        chunks = list(torch.arange(n).view(groups, n // groups))
        return lowest_slots(flat, torch.ones(1, n, dtype=torch.long), [k], [chunks], exclude).reshape(scores.shape)
    if exclude is not None:
        flat[exclude.reshape(-1)] = math.inf
    order = torch.sort(flat, stable=True).indices[: max(0, min(k, n))]
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[order] = True
    return pruned.reshape(scores.shape)


class _Balances:
    """Per-piece counts of the taken units for every balance, in plain Python (this runs per unit)."""

    def __init__(self, balances: Sequence[Sequence[torch.Tensor]], order: list[int]) -> None:
        self.counts: list[list[int]] = []
        self.of_unit: dict[int, list[tuple[int, int, int]]] = {}  # unit -> (balance, piece, entries)
        self.only_in: list[list[list[tuple[int, int]]]] = []  # [balance][piece] -> (unit, entries), by score
        rank = {u: i for i, u in enumerate(order)}
        for pieces in balances:
            if len(pieces) < 2:
                continue
            b = len(self.counts)
            self.counts.append([0] * len(pieces))
            per_unit: dict[int, dict[int, int]] = {}
            for p, piece in enumerate(pieces):
                for u in piece.reshape(-1).tolist():
                    per_unit.setdefault(u, {}).setdefault(p, 0)
                    per_unit[u][p] += 1
            only: list[list[tuple[int, int]]] = [[] for _ in pieces]
            for u, entries in per_unit.items():
                for p, c in entries.items():
                    self.of_unit.setdefault(u, []).append((b, p, c))
                if len(entries) == 1:
                    (p, c), = entries.items()
                    only[p].append((u, c))
            for units in only:
                units.sort(key=lambda uc: rank.get(uc[0], len(rank)))
            self.only_in.append(only)

    def move(self, u: int, free: list[bool]) -> list[int] | None:
        """Unit ``u`` plus the lowest-scored free units that bring every balance back to equal counts.

        Each step fills the piece furthest behind with a unit that lies in that piece only, no
        bigger than the gap; None when some gap cannot be closed.
        """
        counts = {b: list(c) for b, c in enumerate(self.counts)}
        move, chosen = [u], {u}
        dirty = set()
        for b, p, c in self.of_unit.get(u, []):
            counts[b][p] += c
            dirty.add(b)
        while dirty:
            b = dirty.pop()
            cb = counts[b]
            if max(cb) == min(cb):
                continue
            p = cb.index(min(cb))
            deficit = max(cb) - cb[p]
            pick = next((v for v, c in self.only_in[b][p] if c <= deficit and free[v] and v not in chosen), None)
            if pick is None:
                return None
            move.append(pick)
            chosen.add(pick)
            for b2, p2, c2 in self.of_unit[pick]:
                counts[b2][p2] += c2
                dirty.add(b2)
            dirty.add(b)
        return move

    def take(self, units: list[int]) -> None:
        for u in units:
            for b, p, c in self.of_unit.get(u, []):
                self.counts[b][p] += c


def lowest_slots(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budgets: Sequence[int],
    balances: Sequence[Sequence[torch.Tensor]] = (),
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask of the slots to prune: lowest score first, whole slots, within every budget.

    A slot holds ``sizes[m, s]`` units (channels) of member m; a slot is taken only when no member
    would lose more than ``budgets[m]`` units. Each balance is a list of pieces (unit indices, with
    repeats) that must lose equal counts: a slot is taken together with the lowest-scored slots that
    even out every balance again (one per other chunk of a grouped conv; matching slots of the other
    half of a ShuffleNetV2 chunk), or not at all. For one member and equal contiguous chunks this is
    exactly "the ``k // chunks`` lowest of each chunk".
    """
    taken = torch.zeros(scores.numel(), dtype=torch.bool)
    for move in _slot_moves(scores, sizes, budgets, balances, exclude):
        taken[move] = True
    return taken


def _slot_moves(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budgets: Sequence[int],
    balances: Sequence[Sequence[torch.Tensor]] = (),
    exclude: torch.Tensor | None = None,
) -> list[list[int]]:
    """The moves :func:`lowest_slots` takes, in order: each a list of slots, the lowest free slot (its
    first entry, so the moves' first scores never decrease) with the slots that keep every balance even."""
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    order = torch.sort(flat, stable=True).indices.tolist()
    free = [True] * n if exclude is None else (~exclude.reshape(-1).bool()).tolist()
    pieces = _Balances(balances, order)
    cols = sizes.long().t().tolist()  # per unit: channels of each member
    left = [int(b) for b in budgets]
    members = range(len(left))
    moves: list[list[int]] = []
    for u in order:
        if not free[u] or any(cols[u][m] > left[m] for m in members):
            continue
        move = pieces.move(u, free) if pieces.counts else [u]
        if move is None:
            continue
        cost = [sum(cols[v][m] for v in move) for m in members]
        if any(cost[m] > left[m] for m in members):
            continue
        for v in move:
            free[v] = False
        moves.append(move)
        pieces.take(move)
        left = [left[m] - cost[m] for m in members]
    return moves

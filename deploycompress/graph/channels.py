"""Channel identities: a union-find over channel ids and the compact per-tensor channel record.

Every output channel of every Conv/Linear/ConvTranspose gets one integer id. Ops that couple
channels (a residual add, a depthwise conv, a channel shuffle) union ids; ops that mix channels
in a way no smaller model can reproduce (LayerNorm over them, attention, a model output) *pin*
them. A tensor carries its channel ids along at most one axis, which keeps tracing cheap even
on 224x224 activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Pin = Callable[[torch.Tensor, str], None]  # pin(ids, reason)

CONST = -1  # id of a slice that no producer owns (inputs, parameters, constants)


class UnionFind:
    """Union-find over channel ids; the smallest id of a class is its root.

    Held as one tensor of parent pointers and merged a whole vector of pairs at a time (a residual
    add of 2048 channels is one call): roots by pointer jumping, then every larger root points to the
    smallest root it is paired with, until each pair shares a root.
    """

    def __init__(self) -> None:
        self.parent = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.parent.numel())

    def add(self, n: int) -> torch.Tensor:
        start = len(self)
        ids = torch.arange(start, start + n)
        self.parent = torch.cat([self.parent, ids])
        return ids.clone()

    def roots(self) -> torch.Tensor:
        """Root of every id (and the parent pointers compressed to it)."""
        p = self.parent
        while True:
            q = p[p]
            if torch.equal(q, p):
                break
            p = q
        self.parent = p
        return p.clone()

    def union_many(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union a[i] with b[i] wherever both are real ids."""
        a, b = a.reshape(-1).long(), b.reshape(-1).long()
        sel = (a >= 0) & (b >= 0) & (a != b)
        if not bool(sel.any()):
            return
        a, b = a[sel], b[sel]
        while True:
            roots = self.roots()
            ra, rb = roots[a], roots[b]
            differ = ra != rb
            if not bool(differ.any()):
                return
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            self.parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")


@dataclass
class TensorInfo:
    """Channel ids and exact-zero flags of one traced tensor.

    ``axis`` is the one axis along which ids vary (None: one id, or CONST, for the whole tensor);
    ``ids``/``zero`` have one entry per slice along ``axis`` (one entry when ``axis`` is None).
    ``zero[i]`` is True when slice i is zero in the masked model for every input.
    """

    shape: torch.Size
    axis: int | None
    ids: torch.Tensor
    zero: torch.Tensor

    @staticmethod
    def const(shape: torch.Size, zero: bool = False) -> "TensorInfo":
        return TensorInfo(shape, None, torch.tensor([CONST]), torch.tensor([zero]))

    def along(self, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids, zero) per slice of ``axis``; None when the ids vary along another axis."""
        axis = axis % len(self.shape) if len(self.shape) else 0
        size = self.shape[axis] if len(self.shape) else 1
        if self.axis is None:
            return self.ids.expand(size), self.zero.expand(size)
        if self.axis == axis:
            return self.ids, self.zero
        return None

    def real_ids(self) -> torch.Tensor:
        return self.ids[self.ids >= 0]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full float64 tensors of ids and zero flags (1.0 = zero), for data-movement ops."""
        if self.axis is None:
            return (
                torch.full(self.shape, float(self.ids[0]), dtype=torch.float64),
                torch.full(self.shape, float(self.zero[0]), dtype=torch.float64),
            )
        view = [1] * len(self.shape)
        view[self.axis] = -1
        return (
            self.ids.double().view(view).expand(self.shape),
            self.zero.double().view(view).expand(self.shape),
        )


def canonicalize(labels: torch.Tensor, zero: torch.Tensor, uf: UnionFind, pin: Pin) -> TensorInfo:
    """Compress full id/zero tensors to a TensorInfo, coupling ids so they vary along one axis.

    A slice that holds several ids (a channel shuffle's view, a pixel shuffle) unions them; a slice
    that mixes ids with constants pins the ids (removing them would have to cut the constant too).
    """
    shape = labels.shape
    if labels.numel() == 0:
        return TensorInfo.const(shape)
    lo, hi = float(labels.min()), float(labels.max())
    if hi < 0:
        return TensorInfo.const(shape, bool(zero.min() > 0.5))
    if lo == hi:
        return TensorInfo(shape, None, torch.tensor([int(hi)]), torch.tensor([bool(zero.min() > 0.5)]))
    varying = [d for d in range(labels.dim()) if shape[d] > 1 and bool((labels != labels.narrow(d, 0, 1)).any())]
    if len(varying) == 1:
        axis = varying[0]
    else:
        counts = [labels.movedim(d, 0).reshape(shape[d], -1).amax(1).unique().numel() for d in varying]
        axis = varying[max(range(len(varying)), key=lambda i: counts[i])]
    ids = slice_ids(labels, axis, uf, pin)
    z = zero.movedim(axis, 0).reshape(shape[axis], -1).amin(1) > 0.5
    return TensorInfo(shape, axis, ids, z)


def slice_ids(labels: torch.Tensor, axis: int, uf: UnionFind, pin: Pin) -> torch.Tensor:
    """One id per slice of ``axis``: unions the ids inside a slice, pins ids that share one with constants."""
    rows = labels.movedim(axis, 0).reshape(labels.shape[axis], -1)
    lo, hi = rows.amin(1), rows.amax(1)
    mixed = lo != hi
    if bool(mixed.any()):
        sub = rows[mixed]
        first = sub.amax(1, keepdim=True).expand_as(sub)
        uf.union_many(first.long(), sub.long())
        with_const = sub.amin(1) < 0
        if bool(with_const.any()):
            part = sub[with_const]
            pin(part[part >= 0].long().unique(), "a slice mixes channels with constants (padding, a constant concatenated)")
    return hi.long()

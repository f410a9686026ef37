"""Least-squares reconstruction: refit the consumers of pruned channels so the pruned model's layer outputs match the dense model's.

After ``speedup`` removed input channels of a consumer (a 1x1 ``nn.Conv2d`` or an ``nn.Linear``), its remaining
weights are refitted in closed form so that, on calibration inputs, its output in the PRUNED model matches the
same consumer's output in the DENSE model (He et al., 2017, "Channel Pruning for Accelerating Very Deep Neural
Networks", the least-squares step; Luo et al., 2017, "ThiNet"):

    W', b' = argmin_{W, b} || X_kept W^T + b - Y_dense ||^2 + ridge * (tr(X^T X) / C') * || W - W_0 ||^2

with ``X_kept`` (M, C') the consumer's inputs in the pruned model (every spatial position of every image is one
of the M rows, so a few images give many samples), ``Y_dense`` (M, C_out) the dense consumer's outputs, ``W_0``
(C_out, C') the consumer's current weights (the kept columns of the dense weights), solved in float64 through the
normal equations. Consumers are refitted one by one in network order; ``X`` comes from the pruned model with the
earlier consumers already refitted and ``Y`` from the dense model, so errors do not accumulate (He et al.).

The target is the consumer's own output (for a projection conv: before its BatchNorm), and the BatchNorm is left
unchanged: least squares is separable over output channels and BatchNorm in eval mode is a per-channel affine map
``a_c y + b_c``, so matching the post-BN output gives the same minimiser (every channel's error scaled by ``a_c``);
fitting before the BN needs no folding and leaves the running statistics the user calibrated. The fitted intercept
``b'`` goes into the consumer's bias (a bias is added when it had none: the mean contribution of the removed
channels).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batch_list
from .evaluator import _call  # one way to call a model with a batch

log = logging.getLogger(__name__)

__all__ = ["LayerFit", "ReconstructionResult", "check_plain_layer", "kept_inputs", "kept_outputs", "reconstruct"]


@dataclass
class LayerFit:
    """One refitted consumer: relative reconstruction error ``||Y_pruned - Y_dense|| / ||Y_dense||`` over the
    calibration inputs before and after the refit, the kept input channels (indices into the dense consumer's
    inputs) and the number of rows (positions) fitted; for a consumer that lost output channels too, which dense
    outputs its refitted rows are (``-1``: a zero, still-masked row left as it is)."""

    dense: str
    pruned: str
    error_before: float
    error_after: float
    kept: list[int]
    rows: int
    kept_outputs: list[int] | None = None  # dense output channels refitted (None: all); see :func:`kept_outputs`


@dataclass
class ReconstructionResult:
    """The refitted copy of the pruned model and one :class:`LayerFit` per consumer, in network order."""

    model: nn.Module
    layers: list[LayerFit] = field(default_factory=list)


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured layer needs to run."""


def _check_consumer(m: nn.Module, name: str) -> None:
    if isinstance(m, nn.Linear):
        return
    if isinstance(m, nn.Conv2d):
        if m.kernel_size == (1, 1) and m.groups == 1 and m.dilation == (1, 1) and tuple(m.padding) in ((0, 0),) and m.padding_mode == "zeros":
            return
        raise ValueError(f"reconstruct: {name!r} is a Conv2d with kernel {m.kernel_size}, groups {m.groups}, padding {m.padding}; "
                         "only 1x1 convolutions without groups or padding (pointwise) and Linear layers can be refitted: pass their names")
    raise ValueError(f"reconstruct: {name!r} is a {type(m).__name__}; only 1x1 Conv2d and Linear consumers can be refitted")


def check_plain_layer(model: nn.Module, name: str, batch, which: str) -> None:  # noqa: ANN001
    """Refuse a consumer whose class subclasses ``nn.Linear``/``nn.Conv2d`` with a forward that is not its base's
    (an output scale, a weight transform, padding: :mod:`deploycompress.subclasses`, checked on its input from
    ``batch``): the refit writes the weights of the plain base layer, so its reported error would be the base
    layer's while the subclass computes something else. ``ValueError`` naming the layer and the form."""
    from ..subclasses import SubclassError, analyse_layer, is_subclass_layer
    from .distill import eval_mode  # the caller's model (a pruner's) keeps every module's training flag

    m = model.get_submodule(name)
    if not is_subclass_layer(m):
        return
    got: dict[str, tuple] = {}
    h = m.register_forward_pre_hook(lambda _m, args: got.setdefault("args", tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))
    try:
        with torch.no_grad(), eval_mode(model):
            _capture(model, name, batch, which)
    finally:
        h.remove()
    try:
        kind = analyse_layer(name, m, got["args"]).kind
    except SubclassError as exc:
        kind = str(exc)
    if kind != "base":
        raise ValueError(f"reconstruct: {name!r} ({which}) is a {type(m).__name__} whose forward is not its base layer's ({kind}); "
                         "the refit writes a plain layer's weights: bake it first (deploycompress.subclasses.lower_layers) "
                         "or leave it out of the layers refitted")


def _rows(m: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's input ``x`` and output ``y`` as (M, C_in) and (M, C_out) rows, one per position."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    x = x[:, :, :: m.stride[0], :: m.stride[1]]
    if x.shape[2:] != y.shape[2:]:
        raise ValueError(f"reconstruct: {name!r} maps inputs of {tuple(x.shape[2:])} positions (after stride) to {tuple(y.shape[2:])}: "
                         "it pads its input; only unpadded 1x1 convolutions can be refitted")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _match_in_order(dense: torch.Tensor, pruned: torch.Tensor, what: str, name: str, *, zero_kept_back: bool = False) -> list[int]:
    """Index in ``dense`` (slices along dim 0) of each slice of ``pruned``, matched in order (speedup keeps the order);
    with ``zero_kept_back`` an all-zero pruned slice (a masked channel ``speedup(round_to=N)`` kept back) is ``-1``.

    Raises:
        ValueError: a pruned slice equals no remaining dense one (the models were changed after speedup).
    """
    kept, i = [], 0
    for j in range(pruned.shape[0]):
        if zero_kept_back and not pruned[j].any():
            kept.append(-1)
            continue
        while i < dense.shape[0] and not torch.equal(dense[i], pruned[j]):
            i += 1
        if i == dense.shape[0]:
            raise ValueError(f"reconstruct: {what} channel {j} of the pruned {name!r} matches no remaining {what} channel of the dense one; "
                             "pass the models as speedup left them (before any fine-tuning) or refit before training")
        kept.append(i)
        i += 1
    return kept


def kept_inputs(dense_w: torch.Tensor, pruned_w: torch.Tensor, name: str) -> list[int]:
    """Which input channels of the dense consumer (weights (C_out, C)) the pruned one (C_out, C') still reads: each
    pruned column is matched to the dense column it was sliced from (speedup keeps the order)."""
    d, p = dense_w.reshape(dense_w.shape[0], dense_w.shape[1], -1), pruned_w.reshape(pruned_w.shape[0], pruned_w.shape[1], -1)
    if d.shape[0] != p.shape[0] or p.shape[1] > d.shape[1]:
        raise ValueError(f"reconstruct: {name!r} has weights {tuple(pruned_w.shape)} in the pruned model and {tuple(dense_w.shape)} in the "
                         "dense one; the pruned consumer must keep every output and a subset of the inputs (is the pair right?)")
    return _match_in_order(d.transpose(0, 1), p.transpose(0, 1), "input", name)


def kept_outputs(dense_w: torch.Tensor, pruned_w: torch.Tensor, name: str) -> list[int]:
    """Which output channels of the dense layer (weights (C_out, C, ...)) the pruned one (C_out', C, ...) still
    computes, matched row by row in order (speedup keeps the order); an all-zero pruned row (a masked channel
    ``speedup(round_to=N)`` kept back) is ``-1``. The inputs must be the same."""
    if pruned_w.shape[1:] != dense_w.shape[1:] or pruned_w.shape[0] > dense_w.shape[0]:
        raise ValueError(f"reconstruct: {name!r} has weights {tuple(pruned_w.shape)} in the pruned model and {tuple(dense_w.shape)} in the "
                         "dense one; a consumer that lost output channels must keep all its inputs")
    return _match_in_order(dense_w, pruned_w, "output", name, zero_kept_back=True)


def _output_rows(dense_w: torch.Tensor, pruned_w: torch.Tensor, name: str) -> list[int] | None:
    """:func:`kept_outputs` where the layer lost output channels or holds zeroed (still-masked) rows that are not zero
    in the dense layer, else None (every output kept as it is)."""
    if pruned_w.shape[0] == dense_w.shape[0]:
        p, d = pruned_w.reshape(len(pruned_w), -1), dense_w.reshape(len(dense_w), -1)
        if pruned_w.shape[1:] != dense_w.shape[1:] or not bool((~p.any(1) & d.any(1)).any()):
            return None
    return kept_outputs(dense_w, pruned_w, name)


def ridge_term(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """The relative Tikhonov term added to ``gram`` ((C+1, C+1) with the intercept last, not pulled):
    ``ridge * mean(diag)`` on the C weights; at ``ridge=0`` a floor of ``1e-12 * mean(diag)`` keeps the system
    solvable where a channel is constant or zero on the data (a dead ReLU channel made ``ridge=0`` fail with
    ``LinAlgError: ... singular`` after the data had been collected)."""
    cin = gram.shape[0] - 1
    reg = torch.zeros_like(gram)
    if cin:
        mean = float(torch.diagonal(gram)[:cin].mean())
        reg.diagonal()[:cin] = ridge * mean if ridge > 0 else 1e-12 * max(mean, 1e-30)
    return reg


def _capture(model: nn.Module, name: str, batch, want: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``batch`` up to module ``name``; its (input, output)."""
    got = {}

    def hook(_m, inp, out):  # noqa: ANN001, ANN202
        got["x"], got["y"] = inp[0].detach(), out.detach()
        raise _Stop

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        _call(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError(f"reconstruct: the {want} model's forward never called {name!r}")
    return got["x"], got["y"]


def _capture_residual(model: nn.Module, name: str, batch, want: str, residual: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_capture` plus input ``residual[1]`` (positional) of module ``residual[0]``, recorded when that module is
    called (before the consumer runs inside it, or earlier)."""
    got = {}
    owner, index = residual

    def pre(_m, inp):  # noqa: ANN001, ANN202
        if len(inp) <= index:
            raise ValueError(f"reconstruct: {owner!r} was called with {len(inp)} positional inputs; the residual is its input {index}")
        got["r"] = inp[index].detach()

    h = model.get_submodule(owner).register_forward_pre_hook(pre)
    try:
        x, y = _capture(model, name, batch, want)
    finally:
        h.remove()
    if "r" not in got:
        raise RuntimeError(f"reconstruct: the {want} model did not call {owner!r} before {name!r}; it cannot hold the residual {name!r} is added to")
    return x, y, got["r"]


def reconstruct(dense: nn.Module, pruned: nn.Module, layers: Iterable[str | tuple[str, str]], batches: Sequence,
                ridge: float = 1e-4, progress: bool | None = None,
                residuals: Mapping[str, tuple[str, int]] | None = None,
                row_mask: Callable[[Any], torch.Tensor | None] | None = None) -> ReconstructionResult:
    """Refit ``layers`` of a copy of ``pruned`` so their outputs match ``dense``'s on ``batches``; see the module docstring.

    ``layers``: consumer names, each a name present in both models or a pair ``(name in dense, name in pruned)``;
    refitted in the pruned model's module order. A layer may also have lost output channels (an expansion conv
    whose outputs were pruned, its inputs complete but perturbed by earlier pruning): each kept output row is
    fitted to its dense channel (:func:`kept_outputs`). ``batches``: model inputs (tensors, tuples or dicts, as a
    ``TorchEvaluator`` passes them), e.g. calibration views; both models are run in eval mode without gradients.
    ``ridge``: relative Tikhonov weight pulling ``W`` towards the current weights (0: plain least squares, with a
    floor of 1e-12 so that dead channels leave it solvable: :func:`ridge_term`).
    Returns a :class:`ReconstructionResult` with a new model; ``dense`` and ``pruned`` are not modified.

    ``residuals``: ``{pruned consumer name: (module name, input index)}`` for consumers whose output is added to a
    residual stream (e.g. a transformer's attention output projection, added to the layer input inside
    ``attention.output``: ``("<layer>.attention.output", 1)``); the module, named alike in both models, receives
    that residual as positional input ``index``. The target of such a consumer becomes the dense model's *sum*:
    ``Y_dense + r_dense - r_pruned``, so that the consumer also absorbs the drift the earlier layers left in the
    residual (what the following LayerNorm sees is then matched, not only this consumer's share). Its
    :class:`LayerFit` errors are measured against that target.

    ``row_mask``: ``batch -> (...) bool tensor or None``, one flag per row of the fit (for a Linear on (B, T, C)
    inputs: (B, T), e.g. a text batch's attention mask, so that padding tokens are left out of the moments and the
    errors); rows flagged false are not fitted; ``None`` (or the function returning None): every row counts.
    ``ValueError`` when its size is not the batch's row count.

    Raises ``ValueError`` for a consumer that is not a pointwise ``Conv2d``/``Linear`` (or subclasses one with another
    forward: :func:`check_plain_layer`), a name missing from a model, a pair whose pruned weights are not columns of the
    dense weights, a ``residuals`` entry naming no consumer or no module, or no batches — all before any fitting.
    """
    batches = batch_list(batches, "batches")
    if not batches:
        raise ValueError("reconstruct: no batches given; pass a few calibration inputs")
    if ridge < 0:
        raise ValueError(f"reconstruct: ridge must be >= 0, got {ridge}")
    dense = copy.deepcopy(dense).eval()
    model = copy.deepcopy(pruned).eval()
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    pairs = []
    for item in layers:
        d_name, p_name = (item, item) if isinstance(item, str) else item
        for net, n, which in ((dense, d_name, "dense"), (model, p_name, "pruned")):
            if n not in dict(net.named_modules()):
                raise ValueError(f"reconstruct: no module {n!r} in the {which} model")
            _check_consumer(net.get_submodule(n), f"{n} ({which})")
            check_plain_layer(net, n, batches[0], which)
        dw, pw = dense.get_submodule(d_name).weight, model.get_submodule(p_name).weight
        outs = _output_rows(dw, pw, p_name)
        pairs.append((d_name, p_name, kept_inputs(dw[[o for o in outs if o >= 0]] if outs else dw, pw[[j for j, o in enumerate(outs) if o >= 0]] if outs else pw, p_name), outs))
    residuals = dict(residuals or {})
    for p_name, (owner, _) in residuals.items():
        if p_name not in {p for _, p, _, _ in pairs}:
            raise ValueError(f"reconstruct: residuals names {p_name!r}, which is not one of the layers refitted")
        for net, which in ((dense, "dense"), (model, "pruned")):
            if owner not in dict(net.named_modules()):
                raise ValueError(f"reconstruct: residuals names module {owner!r}, absent from the {which} model")
    pairs.sort(key=lambda t: order[t[1]])
    result = ReconstructionResult(model)
    for d_name, p_name, kept, outs in tqdm(pairs, desc="least-squares refit", unit="layer", leave=False, disable=None if progress is None else not progress):
        m = model.get_submodule(p_name)
        cin = m.weight.shape[1]
        xtx = torch.zeros(cin + 1, cin + 1, dtype=torch.float64)
        xty = torch.zeros(cin + 1, m.weight.shape[0], dtype=torch.float64)
        yty = torch.zeros((), dtype=torch.float64)
        ypp = torch.zeros((), dtype=torch.float64)  # ||Y_pruned - Y_dense||^2 before the refit
        rows = 0
        with torch.no_grad():
            for b in batches:
                if p_name in residuals:  # the dense sum: Y_dense + r_dense - r_pruned
                    x, yp, rp = _capture_residual(model, p_name, b, "pruned", residuals[p_name])
                    _, yd, rd = _capture_residual(dense, d_name, b, "dense", residuals[p_name])
                    yd = yd + rd - rp
                else:
                    x, yp = _capture(model, p_name, b, "pruned")
                    _, yd = _capture(dense, d_name, b, "dense")
                x, yp = _rows(m, x, yp, p_name)
                yd = yd.movedim(1, -1).reshape(-1, yd.shape[1]) if isinstance(m, nn.Conv2d) else yd.reshape(-1, yd.shape[-1])
                if outs is not None:  # the pruned rows' dense targets; still-masked rows keep their own output
                    yd = torch.where(torch.tensor(outs) >= 0, yd[:, torch.tensor(outs).clamp(min=0)], yp)
                keep = None if row_mask is None else row_mask(b)
                if keep is not None:  # e.g. padding tokens left out
                    if keep.numel() != len(x):
                        raise ValueError(f"reconstruct: row_mask gave {keep.numel()} flags {tuple(keep.shape)} for the {len(x)} rows of {p_name!r}")
                    keep = keep.reshape(-1).bool()
                    x, yp, yd = x[keep], yp[keep], yd[keep]
                x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
                xtx += x1.T @ x1
                xty += x1.T @ yd.double()
                yty += yd.double().pow(2).sum()
                ypp += (yp.double() - yd.double()).pow(2).sum()
                rows += len(x)
            w0 = m.weight.detach().reshape(m.weight.shape[0], cin).double()
            b0 = m.bias.detach().double() if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=torch.float64)
            theta0 = torch.cat([w0.T, b0[None]], 0)  # (C'+1, C_out)
            reg = ridge_term(xtx, ridge)
            theta = torch.linalg.solve(xtx + reg, xty + reg @ theta0)
            if outs is not None:  # still-masked rows stay exactly as they were (zero), not a fit of their own zero output
                held = torch.tensor(outs) < 0
                theta[:, held] = theta0[:, held]
            # residual of the fit from the accumulated moments: ||X t - Y||^2 = t'X'Xt - 2 t'X'Y + Y'Y
            res = lambda t: float(((t * (xtx @ t)).sum() - 2 * (t * xty).sum() + yty).clamp_min(0))  # noqa: E731
            before = (float(ypp) / float(yty)) ** 0.5 if yty > 0 else 0.0
            after = (res(theta) / float(yty)) ** 0.5 if yty > 0 else 0.0
            m.weight.copy_(theta[:cin].T.reshape(m.weight.shape).to(m.weight.dtype))
            if m.bias is None:
                m.bias = nn.Parameter(theta[cin].to(m.weight.dtype))
            else:
                m.bias.copy_(theta[cin].to(m.bias.dtype))
        if rows <= cin:  # underdetermined: the reported error (often 0) says nothing about other inputs
            from .channel import PruningWarning

            warnings.warn(f"reconstruct {p_name}: fitted on {rows} rows for {cin + 1} unknowns per output (its inputs and the bias): "
                          f"the fit matches these rows exactly and little else (error {after:.3f}); give more calibration inputs/tokens",
                          PruningWarning, stacklevel=2)
        log.info("reconstruct %s: relative error %.4f -> %.4f (%d of %d inputs kept, %d rows)", p_name, before, after, cin,
                 dense.get_submodule(d_name).weight.shape[1], rows)
        result.layers.append(LayerFit(d_name, p_name, before, after, kept, rows, outs))
    return result

"""Closed-form recovery of a head/FFN-pruned BERT-family encoder: least-squares refit and reconstruction-aware selection.

Two steps that need no training, only forward passes on unlabelled calibration text:

- :func:`refit_encoder`: every layer's attention output projection (``attention.output.dense``) and FFN output
  Linear (``output.dense``) of the pruned model is refitted in closed form so its output (before the residual add
  and the LayerNorm) matches the dense model's on the calibration tokens, layer after layer with inputs from the
  already refitted student (He et al., 2017, the least-squares step; the layer-wise reconstruction of Kwon et al.,
  2022, "A Fast Post-Training Pruning Framework for Transformers", applied to the whole output matrix instead of
  one scale per unit). The rule is :func:`deploycompress.pruning.reconstruct.reconstruct` (float64 normal
  equations, a ridge towards the sliced weights, the intercept into the bias); this module only names the Linears.
- :func:`reconstruction_masks`: which heads and FFN channels to remove so that the refit can absorb it best.
  Layer by layer (in order, the earlier layers already pruned and refitted), the inputs ``X`` of the output Linear
  (every head's context vectors, every FFN channel's GELU output) are collected in the current student and its
  target ``Y`` in the dense model; units are then removed greedily by the Optimal Brain Surgeon rule on the
  least-squares objective ``min_W ||X_kept W - Y||^2`` (Hassibi & Stork, 1993; for whole heads and FFN channels
  as groups of columns, as in ZipLM, Kurtic et al., 2023): removing group ``B`` from the current least-squares
  solution ``W`` raises the residual by exactly ``tr(W_B^T (H^-1)_BB^-1 W_B)`` with ``H = X^T X``, and the
  solution and ``H^-1`` are updated in closed form. The chosen units are masked, ``speedup`` removes them and
  the output Linear is refitted before the next layer is measured. The same share of heads and channels goes in
  every layer, or (``allocation="global"``) each layer's share follows its cost curve, measured on the dense
  model, with the same totals (:func:`allocate`). Compare :func:`deploycompress.hf.importance.importance_masks`, which scores each unit alone by its
  output norm and ignores what the kept units can take over.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batch_list
from ..pruning.channel import PruningWarning
from ..pruning.reconstruct import ReconstructionResult, _capture, _capture_residual, reconstruct
from .importance import _layers, layer_masks
from .tokens import token_rows

log = logging.getLogger(__name__)

__all__ = ["ALLOCATIONS", "SelectionResult", "allocate", "obs_remove", "output_linears", "reconstruction_masks", "refit_encoder", "residual_inputs"]


def output_linears(model: nn.Module) -> list[str]:
    """Module names of every layer's attention output projection and FFN output Linear, in layer order
    (``<prefix>.<i>.attention.output.dense``, ``<prefix>.<i>.output.dense``). Raises ``ValueError`` when the
    model has no BERT-style ``encoder.layer`` list."""
    prefix, layers = _layers(model)
    return [f"{prefix}.{i}.{n}" for i in range(len(layers)) for n in ("attention.output.dense", "output.dense")]


def residual_inputs(model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{output Linear: (its parent module, 1)}`` for :func:`output_linears`: in BERT-family layers the parent
    (``attention.output`` / ``output``) is called as ``(hidden_states, input_tensor)`` and adds the residual
    ``input_tensor`` before its LayerNorm (``reconstruct(..., residuals=)`` takes this)."""
    return {n: (n.rsplit(".", 1)[0], 1) for n in output_linears(model)}


def _row_mask(count_padding: bool):  # noqa: ANN202
    """``reconstruct``'s ``row_mask``: padding left out unless ``count_padding``."""
    return None if count_padding else token_rows


def refit_encoder(dense: nn.Module, pruned: nn.Module, batches: Sequence[Any], ridge: float = 1e-3,
                  progress: bool | None = None, absorb_residual: bool = False, count_padding: bool = True) -> ReconstructionResult:
    """Least-squares refit of ``pruned``'s output Linears (:func:`output_linears`) towards ``dense`` (module docstring).

    ``dense``: the unpruned model (e.g. :class:`~deploycompress.hf.Encoder` of a ``BertModel``); ``pruned``: the
    same model after head/FFN pruning and ``speedup``, before any fine-tuning (each Linear's kept input columns
    are found by matching them to the dense ones); ``batches``: inputs as the models take them, e.g.
    ``(input_ids (B, T), attention_mask (B, T))`` tuples; every token is one row of the fit, padding too
    (``count_padding=False``: only the real tokens, where the attention mask is 1,
    :func:`deploycompress.hf.tokens.token_rows`). Neither is better everywhere: padding rows are further samples
    of the same layer at other inputs; on tiny random encoders with 2-5 real tokens in 16 they made one refit worse
    than none (0.951 vs 0.928) where leaving them out gave 0.855, and with 40 batches leaving them out was better in
    8 of 8 cases (by 0.005-0.04); on the MiniLM example (51 sentences of up to 24 tokens, global allocation) leaving
    them out dropped the held-out cosine from 0.502 to 0.267 (docs/tried-from-outside.md, sixth pass). ``ridge``: relative weight pulling each refitted ``W`` (hidden, kept) towards the
    sliced weights. Returns a :class:`~deploycompress.pruning.reconstruct.ReconstructionResult` holding a new
    model; ``dense`` and ``pruned`` are not modified. Bias compensation is part of the fit (the intercept).
    ``absorb_residual``: fit each output Linear to the dense pre-LayerNorm sum ``Y_dense + r_dense - r_student``
    instead of ``Y_dense`` (:func:`residual_inputs`), so it also absorbs the residual drift of earlier layers.

    Raises ``ValueError`` (before any fitting) when a model has no ``encoder.layer`` list, the two lists differ in
    length, a pruned Linear's columns are not a subset of the dense one's, or ``batches`` is empty.
    """
    names, p_names = output_linears(dense), output_linears(pruned)
    if len(names) != len(p_names):
        raise ValueError(f"refit_encoder: the dense model has {len(names) // 2} layers and the pruned one {len(p_names) // 2}; "
                         "pass the model speedup returned for the same dense model")
    return reconstruct(dense, pruned, list(zip(names, p_names)), batches, ridge=ridge, progress=progress,
                       residuals=residual_inputs(pruned) if absorb_residual else None, row_mask=_row_mask(count_padding))


def obs_remove(xtx: torch.Tensor, xty: torch.Tensor, groups: Sequence[Sequence[int]], remove: int,
               damp: float = 1e-6) -> tuple[list[int], list[float]]:
    """Greedy Optimal Brain Surgeon removal of whole column groups from a least-squares fit.

    ``xtx`` (C, C) = ``X^T X`` and ``xty`` (C, N) = ``X^T Y`` of the problem ``min_W ||X W - Y||^2`` (any columns
    not in ``groups``, e.g. an intercept column of ones, are never removed); ``groups``: lists of column indices,
    one per unit (a head's ``head_size`` context columns, or one FFN channel); ``remove``: how many groups go.
    ``damp``: ``damp * mean(diag(xtx))`` is added to the diagonal so ``H`` inverts (a ridge towards zero).
    Each step removes the group ``B`` with the least increase ``tr(W_B^T ((H^-1)_BB)^-1 W_B)`` of the residual
    (exact for this quadratic objective), then updates ``W -= H^-1[:, B] ((H^-1)_BB)^-1 W_B`` and
    ``H^-1 -= H^-1[:, B] ((H^-1)_BB)^-1 H^-1[B, :]`` (Hassibi & Stork, 1993; grouped as in ZipLM, Kurtic et al.,
    2023). Computed in float64. Returns (indices into ``groups`` removed, in removal order; the residual increase
    of each step). Raises ``ValueError`` for mismatched shapes, ``remove`` outside ``[0, len(groups))``, or
    groups that overlap or index outside ``xtx``.
    """
    c = xtx.shape[0]
    if xtx.shape != (c, c) or xty.ndim != 2 or xty.shape[0] != c:
        raise ValueError(f"obs_remove: xtx must be (C, C) and xty (C, N); got {tuple(xtx.shape)} and {tuple(xty.shape)}")
    if not 0 <= remove < len(groups):
        raise ValueError(f"obs_remove: remove must be in [0, {len(groups)}) (at least one group stays), got {remove}")
    flat = [j for g in groups for j in g]
    if len(set(flat)) != len(flat) or any(not 0 <= j < c for j in flat):
        raise ValueError(f"obs_remove: groups must be disjoint column indices in [0, {c})")
    h = xtx.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hinv = torch.linalg.inv(h)
    w = hinv @ xty.double()
    alive = torch.ones(len(groups), dtype=torch.bool)
    singles = torch.tensor([g[0] for g in groups]) if all(len(g) == 1 for g in groups) else None
    removed, costs = [], []
    for _ in range(remove):
        if singles is not None:  # one column per group: every candidate's cost at once
            cost = w[singles].pow(2).sum(1) / hinv.diagonal()[singles]
        else:
            cost = torch.full((len(groups),), float("inf"), dtype=torch.float64)
            for gi in alive.nonzero().flatten().tolist():
                b = list(groups[gi])
                cost[gi] = torch.trace(w[b].T @ torch.linalg.solve(hinv[b][:, b], w[b]))
        cost[~alive] = float("inf")
        best = int(cost.argmin())
        b = list(groups[best])
        inv_bb = torch.linalg.inv(hinv[b][:, b])
        w -= hinv[:, b] @ (inv_bb @ w[b])
        hinv -= hinv[:, b] @ inv_bb @ hinv[b, :]
        alive[best] = False
        removed.append(best)
        costs.append(float(cost[best]))
    return removed, costs


@dataclass
class SelectionResult:
    """``masks``: for the dense model, as :func:`~deploycompress.hf.importance.importance_masks` writes them
    (``speedup`` takes them); ``model``: the dense model pruned by them, sped up and refitted (a new model);
    ``errors``: per output Linear, the relative reconstruction error ``||Y_student - Y_dense|| / ||Y_dense||`` on
    the calibration tokens after its refit; ``kept_heads``/``kept_ffn``: per layer, the kept indices."""

    masks: dict[str, dict[str, torch.Tensor]]
    model: nn.Module
    errors: dict[str, float] = field(default_factory=dict)
    kept_heads: list[list[int]] = field(default_factory=list)
    kept_ffn: list[list[int]] = field(default_factory=list)


def _rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(..., C) -> (M, C) float64, the rows where ``keep`` (None: all)."""
    t = t.reshape(-1, t.shape[-1]).double()
    return t if keep is None else t[keep.reshape(-1)]


def _moments(student: nn.Module, dense: nn.Module, name: str, batches: Sequence[Any],
             residual: tuple[str, int] | None = None, row_mask: Any = None,
             energy_of: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``[X 1]^T [X 1]`` and ``[X 1]^T Y`` (float64) of module ``name``: inputs X in ``student``, outputs Y in ``dense``
    (with ``residual``: ``Y + r_dense - r_student``, the residual being that module input, as in ``reconstruct``),
    over the rows ``row_mask(batch)`` keeps (None: all). With ``energy_of`` (the module input holding the residual;
    ``student`` must be ``dense``): also the energy of the centred dense sum ``Y + r``, from the same pass; else 0."""
    xtx = xty = None
    energy = 0.0
    with torch.no_grad():
        for b in batches:
            keep = None if row_mask is None else row_mask(b)
            if energy_of is not None:
                x, y, r = _capture_residual(dense, name, b, "dense", energy_of)
                z = _rows(y + r, keep)
                energy += float((z - z.mean(-1, keepdim=True)).pow(2).sum())
            elif residual is None:
                x, _ = _capture(student, name, b, "pruned")
                _, y = _capture(dense, name, b, "dense")
            else:
                x, _, rs = _capture_residual(student, name, b, "pruned", residual)
                _, y, rd = _capture_residual(dense, name, b, "dense", residual)
                y = y + rd - rs
            x = _rows(x, keep)
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
            y = _rows(y, keep)
            xtx = x1.T @ x1 if xtx is None else xtx + x1.T @ x1
            xty = x1.T @ y if xty is None else xty + x1.T @ y
    return xtx, xty, energy


ALLOCATIONS = ("uniform", "global")


def allocate(curves: Sequence[Sequence[float]], total: int) -> list[int]:
    """How many units each layer gives up so that ``total`` go in all and the summed cost is least, greedily.

    ``curves[l][k]``: the cost of removing the ``(k+1)``-th unit of layer ``l`` (e.g. the normalised residual increase
    of each :func:`obs_remove` step; ``len(curves[l])`` is the most layer ``l`` may lose). Each step takes the
    cheapest next removal over the layers (optimal when every curve is non-decreasing). Returns the count per layer.
    Raises ``ValueError`` when ``total`` exceeds what the curves allow or is negative.
    """
    if not 0 <= total <= sum(len(c) for c in curves):
        raise ValueError(f"allocate: {total} removals asked, the curves allow 0..{sum(len(c) for c in curves)}")
    counts = [0] * len(curves)
    for _ in range(total):
        best = min((l for l in range(len(curves)) if counts[l] < len(curves[l])), key=lambda l: curves[l][counts[l]])
        counts[best] += 1
    return counts


def _removal_curves(dense: nn.Module, prefix: str, n_layers: int, batches: Sequence[Any], head_sparsity: float,
                    ffn_sparsity: float, damp: float, cap: float, row_mask: Any = None) -> tuple[list[list[float]], list[list[float]]]:
    """Per layer, the OBS cost of each successive head / FFN-channel removal in the dense model (inputs and targets
    both dense), divided by the energy of that layer's centred pre-LayerNorm sum ``Y + r`` (what the LayerNorm after
    it normalises), up to ``cap`` of the units (at least the uniform share, at most all but one)."""
    heads, ffn = [], []
    res = residual_inputs(dense)
    for i in range(n_layers):
        att = dense.get_submodule(f"{prefix}.{i}.attention.self")
        n, d = int(att.num_attention_heads), int(att.attention_head_size)
        m = dense.get_submodule(f"{prefix}.{i}.intermediate.dense").out_features
        for name, groups, share, out in ((f"{prefix}.{i}.attention.output.dense", [range(h * d, (h + 1) * d) for h in range(n)], head_sparsity, heads),
                                         (f"{prefix}.{i}.output.dense", [[j] for j in range(m)], ffn_sparsity, ffn)):
            xtx, xty, energy = _moments(dense, dense, name, batches, row_mask=row_mask, energy_of=res[name])  # one pass
            most = min(len(groups) - 1, max(int(round(share * len(groups))), int(round(cap * len(groups)))))
            _, costs = obs_remove(xtx, xty, groups, most, damp)
            out.append([c / energy for c in costs])
    return heads, ffn


def reconstruction_masks(dense: nn.Module, batches: Sequence[Any], head_sparsity: float, ffn_sparsity: float,
                         ridge: float = 1e-3, damp: float = 1e-6, progress: bool | None = None,
                         absorb_residual: bool = False, allocation: str = "uniform", cap: float = 0.75,
                         count_padding: bool = True) -> SelectionResult:
    """Choose heads and FFN channels by what a least-squares refit can rebuild, layer by layer (module docstring).

    ``dense``: a BERT-family model with an ``encoder.layer`` list (e.g. :class:`~deploycompress.hf.Encoder`),
    only read; ``batches``: calibration inputs as it takes them, e.g. ``(input_ids (B, T), attention_mask (B,
    T))`` (every token is a row of the fit, padding too unless ``count_padding=False``: :func:`refit_encoder`;
    the first batch is also ``speedup``'s example input);
    ``head_sparsity``/``ffn_sparsity``: the share of heads / FFN channels removed in every layer (rounded, at
    least one head and one channel stay); ``ridge``: the refit's ridge (:func:`refit_encoder`); ``damp``: the
    selection's own conditioning (:func:`obs_remove`). Cost: two partial forward passes of both models per output
    Linear and batch for the moments, as many again for the refit. ``absorb_residual``: selection and refit target
    the dense pre-LayerNorm sum (:func:`refit_encoder`). ``allocation``: ``"uniform"`` removes the same share in
    every layer (``round(share * units)`` per layer); ``"global"`` removes ``round(share * all units)`` in total
    (the nearest total to the share asked) but lets each layer give up between none and ``cap`` of its units: a first pass over the dense model records each layer's OBS cost
    curve (residual increase per removal, divided by the energy of the layer's centred pre-LayerNorm sum) and
    :func:`allocate` spreads the removals where they cost least; the layer-by-layer selection then removes that many.

    At least one head and one FFN channel stay in every layer (no layer is removed whole); where that (or ``cap``)
    leaves fewer removals than asked, a ``PruningWarning`` gives the counts.

    Returns a :class:`SelectionResult` (masks for ``dense``, the pruned and refitted model). Raises ``ValueError``
    for sparsities outside ``[0, 1)``, empty ``batches`` or a model without ``encoder.layer`` (before any work).
    """
    from ..speedup import speedup

    for what, v in (("head_sparsity", head_sparsity), ("ffn_sparsity", ffn_sparsity)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"reconstruction_masks: {what} must be in [0, 1), got {v}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"reconstruction_masks: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not 0.0 < cap < 1.0:
        raise ValueError(f"reconstruction_masks: cap must be in (0, 1), got {cap}")
    batches = batch_list(batches, "batches")
    if not batches:
        raise ValueError("reconstruction_masks: no batches given; pass a few calibration inputs")
    prefix, layers = _layers(dense)
    dense = copy.deepcopy(dense).eval()
    n_heads, n_ffn = [], []
    for i in range(len(layers)):
        n_heads.append(int(dense.get_submodule(f"{prefix}.{i}.attention.self").num_attention_heads))
        n_ffn.append(dense.get_submodule(f"{prefix}.{i}.intermediate.dense").out_features)
    drop_heads = [min(n - 1, int(round(head_sparsity * n))) for n in n_heads]
    drop_ffn = [min(m - 1, int(round(ffn_sparsity * m))) for m in n_ffn]
    row_mask = _row_mask(count_padding)
    if allocation == "global":
        h_curves, f_curves = _removal_curves(dense, prefix, len(layers), batches, head_sparsity, ffn_sparsity, damp, cap, row_mask)
        # the total nearest the share of all units (per-layer rounding summed removed 4 of 2 x 3 heads at 0.5), within the caps
        drop_heads = allocate(h_curves, min(int(round(head_sparsity * sum(n_heads))), sum(map(len, h_curves))))
        drop_ffn = allocate(f_curves, min(int(round(ffn_sparsity * sum(n_ffn))), sum(map(len, f_curves))))
        log.info("global allocation: heads removed per layer %s, FFN channels %s", drop_heads, drop_ffn)
    for share, units, dropped, what in ((head_sparsity, n_heads, drop_heads, "heads"), (ffn_sparsity, n_ffn, drop_ffn, "FFN channels")):
        wanted = int(round(share * sum(units))) if allocation == "global" else sum(int(round(share * n)) for n in units)
        if sum(dropped) < wanted:  # at least one unit stays per layer (global: at most cap of a layer goes)
            warnings.warn(f"reconstruction_masks: {sum(dropped)} of {sum(units)} {what} removed, {wanted} asked ({what} sparsity {share}): at "
                          f"least one stays in every layer" + (f" and at most cap={cap} of a layer's go" if allocation == "global" else "")
                          + f"; per layer {list(dropped)} of {list(units)}", PruningWarning, stacklevel=2)
    res = residual_inputs(dense) if absorb_residual else {}  # {output Linear: its residual input}, the same for every layer
    student = copy.deepcopy(dense)
    result = SelectionResult({}, student)
    example = batches[0]
    for i in tqdm(range(len(layers)), desc="select + refit", unit="layer", leave=False, disable=None if progress is None else not progress):
        att = dense.get_submodule(f"{prefix}.{i}.attention.self")
        n, d = int(att.num_attention_heads), int(att.attention_head_size)
        name = f"{prefix}.{i}.attention.output.dense"
        xtx, xty, _ = _moments(student, dense, name, batches, res.get(name), row_mask)
        drop, _ = obs_remove(xtx, xty, [range(h * d, (h + 1) * d) for h in range(n)], drop_heads[i], damp)
        keep_h = torch.ones(n, dtype=torch.bool)
        keep_h[drop] = False
        m = dense.get_submodule(f"{prefix}.{i}.intermediate.dense").out_features
        keep_f = torch.ones(m, dtype=torch.bool)
        layer_m = layer_masks(dense, prefix, i, keep_h, keep_f)
        att_m = {k: v for k, v in layer_m.items() if ".attention.self." in k}
        if not keep_h.all():
            student = speedup(student, att_m, example)
        fit = reconstruct(dense, student, [name], batches, ridge=ridge, progress=False, residuals={name: res[name]} if res else None, row_mask=row_mask)
        student, result.errors[name] = fit.model, fit.layers[0].error_after
        name_f = f"{prefix}.{i}.output.dense"
        xtx, xty, _ = _moments(student, dense, name_f, batches, res.get(name_f), row_mask)
        drop, _ = obs_remove(xtx, xty, [[j] for j in range(m)], drop_ffn[i], damp)
        keep_f[drop] = False
        layer_m = layer_masks(dense, prefix, i, keep_h, keep_f)
        ffn_m = {k: v for k, v in layer_m.items() if k.endswith("intermediate.dense")}
        if not keep_f.all():
            student = speedup(student, ffn_m, example)
        fit = reconstruct(dense, student, [name_f], batches, ridge=ridge, progress=False, residuals={name_f: res[name_f]} if res else None, row_mask=row_mask)
        student, result.errors[name_f] = fit.model, fit.layers[0].error_after
        result.masks.update(layer_m)
        result.kept_heads.append(keep_h.nonzero().flatten().tolist())
        result.kept_ffn.append(keep_f.nonzero().flatten().tolist())
        log.info("layer %d: heads kept %s", i, result.kept_heads[-1])
    result.model = student
    return result

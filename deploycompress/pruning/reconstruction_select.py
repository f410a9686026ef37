"""Reconstruction-aware channel selection: prune the channels whose loss a least-squares refit of their consumer absorbs best.

A producer's output channels (e.g. an inverted-residual block's expansion conv) reach the rest of the network only
through one consumer (the block's 1x1 projection conv). Removing a set of them and refitting the consumer's
remaining weights by least squares (:mod:`deploycompress.pruning.reconstruct`) leaves an error that depends on
*which* channels went: channels that are (nearly) linear combinations of the kept ones cost (nearly) nothing.
This pruner selects for that error, as ThiNet (Luo, Wu and Lin, "ThiNet: A Filter Level Pruning Method for Deep
Neural Network Compression", ICCV 2017: greedy selection of the channels whose removal least changes the next
layer's output) and He, Zhang and Sun ("Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017:
channel selection, then least-squares reconstruction, layer by layer, inputs from the already-pruned model) do.
The greedy step here scores each candidate by the error *after* the refit, which has a closed form: with
``A = X^T X + ridge`` the consumer's input Gram matrix (rows: every position of every calibration input, plus an
intercept column) and ``beta`` the current least-squares weights, removing input channel ``j`` raises the residual
by ``||beta_j||^2 / (A^-1)_jj`` (the structured Optimal Brain Surgeon step of Frantar and Alistarh, "Optimal Brain
Compression", NeurIPS 2022); ``A^-1`` and ``beta`` are updated by a rank-one downdate, so one backward-elimination
pass gives the whole removal order, O(C^2) per removed channel.

Two passes over ``batches``:

1. **Allocation** (only for ``total_sparsity`` entries of ``config_list``): one forward pass of the dense model
   gives every consumer's Gram matrix (the dense targets are the consumer's own outputs, ``Y = X W^T + b``); each
   layer's backward elimination gives its curve of relative error ``||Y_refit - Y|| / ||Y||`` against channels
   removed, and the budget takes the channels with the lowest error on that curve across layers (the layers end
   near a common error; ``max_sparsity_per_layer`` and the weight-count budget as for every pruner).
2. **Selection**, layer by layer in network order (He et al.): ``X`` from a working copy of the model in which
   the earlier consumers are already pruned (removed columns zeroed) and refitted, ``Y`` from the dense model; the
   layer's count (``sparsity``, or pass 1's) is removed by backward elimination, the consumer refitted, next layer.

Layers before the first removal (in module order) are left as they are (their inputs are the dense ones).
Layers named in ``refit`` (pointwise, e.g. the expansion convs of later blocks and a head conv, whose inputs
earlier pruning perturbed) are refitted in the same network-order pass, all their outputs against the dense ones.

The masks are the usual output-channel masks of the producers (with ``dependency_aware=True`` and ``dummy_input``
the joined BatchNorm/depthwise parameters too), for ``speedup``. The refit is not written into the caller's model:
``refitted_model`` is a separate copy in which every consumer is refitted on its kept inputs (the removed
channels' weight columns zero) and every ``refit`` layer refitted; ``speedup(pruner.refitted_model, masks,
example)`` gives the small, refitted model in one step (or run :func:`deploycompress.pruning.reconstruct.reconstruct`
on a sped-up model). ``round_to=N`` keeps every producer's kept width a multiple of N, so that
``speedup(round_to=N)`` removes exactly the selected channels.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import batch_list
from ..config import ModuleConfig
from .allocate import global_prune_counts, prune_count
from .channel import ChannelPruner, PruningWarning, channel_dim
from .evaluator import _call
from .io import _weight
from .reconstruct import LayerFit, _capture, _check_consumer, _rows, check_plain_layer, ridge_term

log = logging.getLogger(__name__)

__all__ = ["ReconstructionPruner", "backward_elimination"]


def backward_elimination(gram: torch.Tensor, cross: torch.Tensor, yty: float, steps: int, fixed: int = 1) -> tuple[list[int], list[float]]:
    """Greedy removal of ``steps`` of the first ``C`` regressors of a multi-output least-squares problem.

    ``gram`` (C+K, C+K): ``X^T X`` (plus any ridge) of C removable regressors followed by ``fixed`` = K always-kept
    ones (an intercept); ``cross`` (C+K, O): ``X^T Y``; ``yty``: ``||Y||^2``. Each step removes the regressor whose
    removal raises the refitted residual ``min_beta ||X beta - Y||^2`` least (exactly, given the earlier removals).
    Returns the removal order (indices into the C) and the residual after each removal (non-decreasing).
    ``gram`` must be positive definite (add a ridge); ``ValueError`` for mismatched shapes or ``steps`` > C.
    """
    n = gram.shape[0]
    if gram.shape != (n, n) or cross.dim() != 2 or cross.shape[0] != n or not 0 <= fixed <= n:
        raise ValueError(f"backward_elimination: gram {tuple(gram.shape)}, cross {tuple(cross.shape)} and fixed={fixed} do not match")
    ainv = torch.cholesky_inverse(torch.linalg.cholesky(gram.double()))
    beta = ainv @ cross.double()
    rss = float(yty) - float((cross.double() * beta).sum())
    return _eliminate(ainv, beta, rss, steps, n - fixed)


def _eliminate(ainv: torch.Tensor, beta: torch.Tensor, rss: float, steps: int, removable: int,
               weights: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """Backward elimination from the inverse Gram matrix and solution of the full problem (both updated in place);
    ``weights`` (O,): each output's squared error counts that many times (the fit itself is separable per output)."""
    if not 0 <= steps <= removable:
        raise ValueError(f"backward_elimination: cannot remove {steps} of {removable} regressors")
    alive = torch.ones(removable, dtype=torch.bool)
    order, curve = [], []
    for _ in range(steps):
        d = ainv.diagonal()[:removable]
        sq = beta[:removable].pow(2)
        cost = (sq if weights is None else sq * weights).sum(1) / d.clamp_min(1e-300)
        cost[~alive] = math.inf
        j = int(torch.argmin(cost))
        rss += float(cost[j])
        col = ainv[:, j].clone()
        ainv -= torch.outer(col, col) / col[j]
        beta -= torch.outer(col, beta[j]) / col[j]
        ainv[j], ainv[:, j], beta[j] = 0, 0, 0
        alive[j] = False
        order.append(j)
        curve.append(max(rss, 0.0))
    return order, curve


def _moments(x: torch.Tensor, y: torch.Tensor | None, acc: dict) -> None:
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    acc["gram"] = acc.get("gram", 0) + x1.T @ x1
    if y is not None:
        acc["cross"] = acc.get("cross", 0) + x1.T @ y.double()
        acc["yty"] = acc.get("yty", 0) + float(y.double().pow(2).sum())
    acc["rows"] = acc.get("rows", 0) + len(x)


def _theta(m: nn.Module) -> torch.Tensor:
    """A consumer's weights and bias as one (C_in + 1, C_out) float64 matrix."""
    w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w.T, b[None]], 0)


class ReconstructionPruner(ChannelPruner):
    """Output channels of the selected producers, chosen by the least-squares error of their consumer; see the
    module docstring.

    ``(model, config_list, batches, *, consumers, ridge=1e-2, round_to=1, refit=(), cache_mb=1024, output_weights=None,
    dependency_aware=False, dummy_input=None, progress=None)``. ``config_list``: NNI's spec (``sparsity`` per layer, or ``total_sparsity``
    with ``max_sparsity_per_layer``); ``batches``: model inputs (tensors, tuples or dicts) — every spatial position
    of every input is one least-squares row; ``consumers``: for each selected layer, the name of the one
    pointwise module (1x1 ``Conv2d`` without groups or padding, or ``Linear``) that reads its channels, in the same
    order (e.g. an expansion conv's projection conv); ``ridge``: relative Tikhonov weight of the refit (as
    :func:`reconstruct`); ``refit``: further pointwise layers refitted in the same pass; ``cache_mb``: memory for
    the dense model's outputs of those layers, taken in one pass (layers beyond it are re-run per layer);
    ``output_weights``: per consumer, (C_out,) weights of each output's squared error in the selection (e.g. a
    following eval-mode BatchNorm's ``(gamma / sqrt(var + eps))^2``, so the error counts in its output's units;
    the refit is separable per output and does not change). After ``compress()``,
    ``layer_fits`` holds one :class:`LayerFit` per refitted layer in network order (relative error of its output
    with the inputs as pruned so far and after the refit, the kept input channels) and ``refitted_model`` the
    refitted copy (see the module docstring).

    Raises ``ValueError`` (before any data runs but one batch through a layer subclass) for a selected layer without a
    consumer, a consumer that is no module, not pointwise (or a layer subclass whose forward is not its base's:
    :func:`~deploycompress.pruning.reconstruct.check_plain_layer`), or reads a different number of channels than the
    layer has outputs; empty ``batches``;
    ``ridge < 0`` or ``round_to < 1``. The model is only masked, as by every pruner.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        batches: Sequence[Any],
        *,
        consumers: Mapping[str, str],
        ridge: float = 1e-2,
        round_to: int = 1,
        refit: Sequence[str] = (),
        cache_mb: float = 1024.0,
        output_weights: Mapping[str, torch.Tensor] | None = None,
        dependency_aware: bool = False,
        dummy_input: Any = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, config_list, dependency_aware=dependency_aware, dummy_input=dummy_input)
        name = type(self).__name__
        self.batches = batch_list(batches, "batches")
        if not self.batches:
            raise ValueError(f"{name}: no batches given; pass a few calibration inputs")
        if ridge < 0:
            raise ValueError(f"{name}: ridge must be >= 0, got {ridge}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"{name}: round_to must be a positive int, got {round_to!r}")
        self.ridge, self.round_to, self.progress, self.cache_mb = ridge, round_to, progress, cache_mb
        self.output_weights = dict(output_weights or {})
        self.consumers = dict(consumers)
        modules = dict(model.named_modules())
        self.refit = list(refit)
        for r in self.refit:
            if r not in modules:
                raise ValueError(f"{name}: refit names {r!r}, which is no submodule of the model")
            if r in self.consumers.values():
                raise ValueError(f"{name}: {r!r} is in refit and a consumer (consumers are refitted anyway)")
            _check_consumer(modules[r], r)
        for layer, module in self._modules.items():
            if layer not in self.consumers:
                raise ValueError(f"{name}: no consumer given for {layer!r}; pass consumers={{{layer!r}: <the 1x1 conv or Linear reading it>}}")
            consumer = self.consumers[layer]
            if consumer not in modules:
                raise ValueError(f"{name}: consumer {consumer!r} of {layer!r} is no submodule of the model")
            _check_consumer(modules[consumer], consumer)
            weight = _weight(module)
            assert weight is not None
            channels, reads = weight.shape[channel_dim(module)], modules[consumer].weight.shape[1]
            if channels != reads:
                raise ValueError(f"{name}: consumer {consumer!r} reads {reads} channels but {layer!r} has {channels}: name the module that reads them")
        for consumer, w in self.output_weights.items():
            if consumer not in self.consumers.values():
                raise ValueError(f"{name}: output_weights names {consumer!r}, which is no consumer")
            outs = modules[consumer].weight.shape[0]
            if w.numel() != outs or bool((w < 0).any()):
                raise ValueError(f"{name}: output_weights[{consumer!r}] must be {outs} non-negative weights, one per output, got shape {tuple(w.shape)}")
        extra = sorted(set(self.consumers) - set(self._modules))
        if extra:
            raise ValueError(f"{name}: consumers names {extra}, which config_list does not select")
        for consumer in list(self.consumers.values()) + self.refit:  # a subclass with another forward: refused by name
            check_plain_layer(model, consumer, self.batches[0], "model")
        order = {n: i for i, n in enumerate(modules)}
        self._order = sorted(self._modules, key=lambda n: order[self.consumers[n]])
        self._counts: dict[str, int] = {}
        self._scores: dict[str, torch.Tensor] = {}
        self.layer_fits: list[LayerFit] = []
        self.refitted_model: nn.Module | None = None

    # ------------------------------------------------------------------ counts
    def _rounded(self, n: int, count: int) -> int:
        """Fewer removed channels so that the kept width is a multiple of ``round_to`` (or all)."""
        kept = min(n, math.ceil((n - count) / self.round_to) * self.round_to)
        return n - max(kept, 1)

    def _allocate(self, dense: nn.Module) -> dict[str, int]:
        counts, budgets = {}, {}
        for layer in self._order:
            cfg = self.module_configs[layer]
            n = dense.get_submodule(self.consumers[layer]).weight.shape[1]
            if cfg.sparsity is not None:
                counts[layer] = prune_count(cfg.sparsity, n, cfg.sparse_rounding)
            else:
                key = ("group", cfg.global_group_id) if cfg.global_group_id is not None else ("config", cfg.config_index)
                budgets.setdefault(key, []).append(layer)
        if budgets:
            acc: dict[str, dict] = {n: {} for names in budgets.values() for n in names}

            def hook(a: dict, name: str):  # noqa: ANN202
                return lambda mod, inp, out: _moments(_rows(mod, inp[0].detach(), out.detach(), name)[0], None, a)

            self._run_hooked(dense, [(self.consumers[layer], hook(a, self.consumers[layer])) for layer, a in acc.items()],
                             self.batches, "reconstruction allocation")
            curves = {}
            for layer, a in acc.items():
                theta0 = _theta(dense.get_submodule(self.consumers[layer]))
                gram = a["gram"]
                reg = ridge_term(gram, self.ridge)
                yty = float((theta0 * (gram @ theta0)).sum())
                cfg = self.module_configs[layer]
                n = gram.shape[0] - 1
                cap = prune_count(cfg.max_sparsity_per_layer if cfg.max_sparsity_per_layer is not None else 1.0, n)
                ainv = torch.cholesky_inverse(torch.linalg.cholesky(gram + reg))
                beta = theta0.clone()  # (gram + reg) theta0 = gram theta0 + reg theta0: the dense weights solve it
                order, curve = _eliminate(ainv, beta, 0.0, cap, n, self._weights(self.consumers[layer]))
                score = torch.full((n,), math.inf)
                score[order] = torch.tensor([(r / yty) ** 0.5 if yty > 0 else 0.0 for r in curve], dtype=torch.float32)
                curves[layer] = score
            for names in budgets.values():
                cfg = self.module_configs[names[0]]
                assert cfg.total_sparsity is not None
                counts.update(global_prune_counts(
                    {n: curves[n] for n in names}, {n: self._unit_cost(n, curves[n]) for n in names}, cfg.total_sparsity,
                    {n: self.module_configs[n].max_sparsity_per_layer for n in names}, rounding=cfg.sparse_rounding))  # fmt: skip
        rounded = {layer: self._rounded(dense.get_submodule(self.consumers[layer]).weight.shape[1], c) for layer, c in counts.items()}
        for names in budgets.values():  # a total_sparsity budget that round_to cuts short is said, not met silently
            weights = {n: _weight(self._modules[n]) for n in names}
            per = {n: w.numel() / w.shape[channel_dim(self._modules[n])] for n, w in weights.items() if w is not None}
            total = sum(w.numel() for w in weights.values() if w is not None)
            asked, got = (sum(c[n] * per[n] for n in names) / total for c in (counts, rounded))
            if got < asked:
                warnings.warn(f"{type(self).__name__}: round_to={self.round_to} keeps every kept width a multiple of {self.round_to}, so the "
                              f"total_sparsity budget removes {got:.4f} of the selected layers' weights instead of {asked:.4f}", PruningWarning, stacklevel=2)
        return rounded

    def _weights(self, consumer: str) -> torch.Tensor | None:
        w = self.output_weights.get(consumer)
        return None if w is None else w.detach().double().reshape(-1)

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    def _run_hooked(self, model: nn.Module, hooks: Sequence[tuple[str, Any]], batches: Sequence, desc: str) -> None:
        """Run ``model`` on ``batches`` without gradients (a progress bar named ``desc``) with each ``(module name,
        forward hook)`` of ``hooks`` registered; the hooks are removed afterwards, also when a batch fails."""
        handles = [model.get_submodule(name).register_forward_hook(fn) for name, fn in hooks]
        try:
            with torch.no_grad():
                for b in tqdm(batches, desc=desc, unit="batch", leave=False, disable=self._quiet()):
                    _call(model, b)
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ pipeline
    def _prepare(self) -> None:
        was_training = self.model.training
        dense = copy.deepcopy(self.model).eval()
        work = copy.deepcopy(self.model).eval()
        self.model.train(was_training)
        self._counts = self._allocate(dense)
        self._scores, self.layer_fits = {}, []
        order = {n: i for i, n in enumerate(dict(work.named_modules()))}
        steps = sorted([(self.consumers[n], n) for n in self._order] + [(n, None) for n in self.refit], key=lambda t: order[t[0]])
        first = next((i for i, (_, layer) in enumerate(steps) if layer is not None and self._counts[layer] > 0), len(steps))
        for cname, layer in steps[:first]:  # nothing removed before them (module order): their inputs are the dense ones
            if layer is not None:
                n = work.get_submodule(cname).weight.shape[1]
                self._scores[layer] = torch.ones(n)
        steps = steps[first:]
        targets = self._dense_targets(dense, [c for c, _ in steps])
        for cname, layer in tqdm(steps, desc="reconstruction selection", unit="layer", leave=False, disable=self._quiet()):
            self._fit(work, dense, cname, layer, targets.pop(cname, None))
        self.refitted_model = work

    def _dense_targets(self, dense: nn.Module, names: list[str]) -> dict[str, list[torch.Tensor]]:
        """The dense outputs of ``names`` on every batch, from one pass, for as many layers (in order) as fit in
        ``cache_mb``; the others are captured layer by layer."""
        sizes: dict[str, int] = {}
        self._run_hooked(dense, [(n, lambda _m, _i, out, n=n: sizes.__setitem__(n, out.numel() * out.element_size())) for n in names],
                         self.batches[:1], "dense output sizes")
        keep, total = [], 0.0
        for n in names:
            total += sizes.get(n, 0) * len(self.batches) / 2**20
            if total > self.cache_mb:
                break
            keep.append(n)
        if not keep:
            return {}
        out: dict[str, list[torch.Tensor]] = {n: [] for n in keep}
        self._run_hooked(dense, [(n, lambda _m, _i, y, n=n: out[n].append(y.detach().clone())) for n in keep], self.batches, "dense targets")
        log.info("%s: dense outputs of %d of %d layers kept (%.0f MB)", type(self).__name__, len(keep), len(names),
                 sum(t.numel() * t.element_size() for v in out.values() for t in v) / 2**20)
        return out

    def _fit(self, work: nn.Module, dense: nn.Module, cname: str, layer: str | None, targets: list[torch.Tensor] | None) -> None:
        """Refit ``cname`` in ``work`` against ``dense`` on the batches, after removing ``layer``'s count of its inputs."""
        m = work.get_submodule(cname)
        acc: dict = {}
        err0 = 0.0
        with torch.no_grad():
            for i, b in enumerate(self.batches):
                x, yp = _capture(work, cname, b, "pruned")
                yd = targets[i] if targets is not None else _capture(dense, cname, b, "dense")[1]
                x, yp = _rows(m, x, yp, cname)
                yd = yd.movedim(1, -1).reshape(-1, yd.shape[1]) if isinstance(m, nn.Conv2d) else yd.reshape(-1, yd.shape[-1])
                _moments(x, yd, acc)
                err0 += float((yp.double() - yd.double()).pow(2).sum())
        gram, n = acc["gram"], acc["gram"].shape[0] - 1
        reg = ridge_term(gram, self.ridge)
        theta0 = _theta(m)
        cross = acc["cross"] + reg @ theta0
        count = self._counts[layer] if layer is not None else 0
        removed: list[int] = []
        if count:
            ainv = torch.cholesky_inverse(torch.linalg.cholesky(gram + reg))
            removed, _ = _eliminate(ainv, ainv @ cross, 0.0, count, n, self._weights(cname))
        kept = torch.ones(n + 1, dtype=torch.bool)
        kept[removed] = False
        with torch.no_grad():
            theta = torch.zeros_like(theta0)
            theta[kept] = torch.linalg.solve((gram + reg)[kept][:, kept], cross[kept])
            res = float(((theta * (gram @ theta)).sum() - 2 * (theta * acc["cross"]).sum() + acc["yty"]))
            m.weight.copy_(theta[:n].T.reshape(m.weight.shape).to(m.weight.dtype))
            if m.bias is None:
                m.bias = nn.Parameter(theta[n].to(m.weight.dtype))
            else:
                m.bias.copy_(theta[n].to(m.bias.dtype))
        yty = acc["yty"]
        before, after = ((err0 / yty) ** 0.5, (max(res, 0.0) / yty) ** 0.5) if yty > 0 else (0.0, 0.0)
        if layer is not None:
            score = torch.full((n,), float(count + 1))
            score[removed] = torch.arange(count, dtype=torch.float32)
            self._scores[layer] = score
        self.layer_fits.append(LayerFit(cname if layer is None else layer, cname, before, after, torch.nonzero(kept[:n]).flatten().tolist(), acc["rows"]))
        log.info("%s %s: %d of %d input channels removed (%s); relative error %.4f (inputs as pruned so far) -> %.4f after the refit",
                 type(self).__name__, cname, count, n, layer or "refit only", before, after)

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        """Removal rank (removed channels ``0..count-1`` in the order chosen; kept channels ``count + 1``)."""
        return self._scores[name]

    def _prune_counts(self, scores: dict[str, torch.Tensor]) -> dict[str, int]:
        return dict(self._counts)

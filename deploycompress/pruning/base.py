"""The Pruner base: config resolution, the score -> count -> mask pipeline, masks in the forward pass.

Masks are applied with ``torch.nn.utils.parametrize``: ``module.weight`` *is* ``original * mask``,
so gradients of pruned weights are zero and fine-tuning with any optimizer keeps them at zero. The
parameters themselves stay the same objects, so an optimizer made before ``compress()`` still works.

A pruner is its scoring rule: subclasses (see ``level.py`` and ``channel.py``) say what a unit is
(one weight, one output channel) and how to score it; the base turns scores into masks for a
per-layer ``sparsity`` or a global ``total_sparsity``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import ConfigError, ModuleConfig, select_modules
from .allocate import CoupledUnits, global_prune_counts, lowest, prune_count
from .io import Masks, _param, _weight, atomic_torch_save, save_masks

__all__ = ["Pruner"]

log = logging.getLogger(__name__)


class _Mask(nn.Module):
    """Parametrization ``weight = original * mask``; the mask is not part of the state dict."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def _refuse_masked_model(model: nn.Module, algorithm: str) -> None:
    """A model whose forward pass still holds another pruner's masks is refused before any work.

    Its masks would stay in force under the new pruner's: the masks it returns (and the counts it reports) would not
    describe the model, and speedup of them would keep the other pruner's zeroed channels.
    """
    held = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)
            and any(isinstance(p, _Mask) or type(p).__name__ == "_SoftMask" for ps in m.parametrizations.values() for p in ps)]
    if held:
        raise ConfigError(
            f"{algorithm}: the model still holds another pruner's masks in its forward pass ({held[:4]}"
            f"{' and %d more' % (len(held) - 4) if len(held) > 4 else ''}); they would stay in force under these masks. "
            "Remove them first: model = other_pruner.unwrap_model() (pruned weights stay zero, so norm-based pruners rank "
            "them lowest), or deploycompress.model_copy.plain_copy(model), or start from a fresh model"
        )


class Pruner:
    """``Pruner(model, config_list, **algo_args).compress() -> (model, masks)``.

    Subclasses implement ``_score`` (one score per unit) and ``_expand`` (pruned units -> masks),
    and may override ``_prepare`` (collect statistics before scoring) and ``_select``.
    """

    #: module types that ``op_types: ['default']`` stands for
    default_op_types: ClassVar[tuple[str, ...]] = ("Conv2d", "Linear")
    #: module types this pruner can mask (None: any module with a ``weight``)
    supported_op_types: tuple[str, ...] | None = None
    #: whether NNI 3.0's ``dependency_group_id``/``internal_metric_block`` mean something to this pruner
    #: (channel pruners: the coupled channels come from the traced graph with ``dependency_aware=True``)
    honours_dependency_groups: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config_list: Sequence[dict[str, Any]]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _refuse_masked_model(model, type(self).__name__)
        self.model = model
        self.config_list = config_list
        self.module_configs: dict[str, ModuleConfig] = select_modules(
            model,
            config_list,
            kind="pruning",
            default_op_types=self.default_op_types,
            supported_op_types=self.supported_op_types,
            algorithm=type(self).__name__,
        )
        modules = dict(model.named_modules())
        self._modules: dict[str, nn.Module] = {name: modules[name] for name in self.module_configs}
        _refuse_linear_like(self._modules, type(self).__name__)
        for name, module in self._modules.items():
            if _weight(module) is None:
                raise ConfigError(
                    f"config_list[{self.module_configs[name].config_index}] selects module {name!r} "
                    f"({type(module).__name__}), which has no weight to prune"
                )
        coupled = [n for n, c in self.module_configs.items() if c.dependency_group_id is not None or c.internal_metric_block is not None]
        if coupled and not self.honours_dependency_groups:
            raise ConfigError(
                f"{type(self).__name__} prunes single weights: NNI 3.0's dependency_group_id/internal_metric_block "
                f"(channel coupling, given for {coupled[:4]}) do not apply; remove them"
            )
        self._masks: Masks = {}
        self._wrapped = False
        #: weight elements one unit of a layer counts in a ``total_sparsity`` budget, by layer name (default: its
        #: own); a scheduler pruning a sped-up model sets the original model's, so the budget counts original cost
        self.budget_unit_costs: dict[str, int] = {}

    # ------------------------------------------------------------------ pipeline
    def compress(self) -> tuple[nn.Module, Masks]:
        """Score, allocate, and put the masks into the model's forward pass."""
        if self._wrapped:
            self._unwrap()
        self._prepare()
        with torch.no_grad():
            scores = {name: self._score(name, m, self.module_configs[name]) for name, m in self._modules.items()}
        pruned = self._select(scores, self._prune_counts(scores))
        self._masks = self._joined({name: self._expand(name, self._modules[name], pruned[name]) for name in scores})
        self._wrap()
        for name, entry in self._masks.items():
            w = next(iter(entry.values()))
            log.info("%s: %s pruned %d of %d weights", type(self).__name__, name, int((~w).sum()), w.numel())
        return self.model, self._masks

    def _joined(self, masks: Masks) -> Masks:
        """Masks plus those of parameters joined to them (channel pruners: see ``ChannelPruner``)."""
        return masks

    def _prepare(self) -> None:
        """Collect what scoring needs (activations, gradients, a regularised training run)."""

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        raise NotImplementedError

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _unit_cost(self, name: str, scores: torch.Tensor) -> int:
        """Weight elements per scored unit: what a ``total_sparsity`` budget counts (``budget_unit_costs``
        when it names the layer, else the layer's own weight elements per unit)."""
        if name in self.budget_unit_costs:
            return int(self.budget_unit_costs[name])
        weight = _weight(self._modules[name])
        assert weight is not None
        return weight.numel() // scores.numel()

    def _prune_counts(self, scores: dict[str, torch.Tensor]) -> dict[str, int]:
        counts: dict[str, int] = {}
        budgets: dict[tuple[str, Any], list[str]] = {}
        for name, s in scores.items():
            cfg = self.module_configs[name]
            if cfg.sparsity is not None:
                counts[name] = prune_count(cfg.sparsity, s.numel(), cfg.sparse_rounding)
            elif cfg.global_group_id is not None:  # NNI 3.0: one budget across configs
                budgets.setdefault(("group", cfg.global_group_id), []).append(name)
            else:
                budgets.setdefault(("config", cfg.config_index), []).append(name)
        for names in budgets.values():
            total = self.module_configs[names[0]].total_sparsity
            assert total is not None
            counts.update(
                global_prune_counts(
                    {n: scores[n] for n in names},
                    {n: self._unit_cost(n, scores[n]) for n in names},
                    total,
                    {n: self.module_configs[n].max_sparsity_per_layer for n in names},
                    rounding=self.module_configs[names[0]].sparse_rounding,
                    coupled=self._coupled_units(names, scores),
                )
            )
        return counts

    def _coupled_units(self, names: list[str], scores: dict[str, torch.Tensor]) -> list[CoupledUnits]:
        """Layers of one ``total_sparsity`` budget whose units are ranked and counted together (none here;
        dependency-aware channel pruners: the coupled channels of each group)."""
        return []

    def _select(self, scores: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Which units to prune (True = prune): each layer's ``counts[name]`` lowest scores."""
        return {name: lowest(s, counts[name]) for name, s in scores.items()}

    # ------------------------------------------------------------------ masks in the model
    @property
    def masks(self) -> Masks:
        return self._masks

    def _wrap(self) -> None:
        modules = dict(self.model.named_modules())
        for name, entry in self._masks.items():
            module = modules[name]
            for pname, mask in entry.items():
                param = _param(module, pname)
                assert param is not None
                parametrize.register_parametrization(module, pname, _Mask(mask.to(param.device)), unsafe=True)
        self._wrapped = True

    def _unwrap(self) -> None:
        """Remove the parametrizations, leaving the masked values (pruned weights = 0) in place."""
        modules = dict(self.model.named_modules())
        for name, entry in self._masks.items():
            module = modules[name]
            for pname in entry:
                if parametrize.is_parametrized(module, pname):
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        self._wrapped = False

    def unwrap_model(self) -> nn.Module:
        """The plain model (same module objects) with pruned weights set to zero; masks stay in ``self.masks``."""
        self._unwrap()
        return self.model

    _unwrap_model = unwrap_model  # NNI 2.x examples call this before speedup

    def update_epoch(self, epoch: int) -> None:
        """Called at each epoch start; one-shot pruners need nothing here."""

    def step(self) -> None:
        """Called after each optimizer step; one-shot pruners need nothing here."""

    # ------------------------------------------------------------------ export
    def export_model(
        self,
        model_path: str | os.PathLike[str],
        mask_path: str | os.PathLike[str] | None = None,
        onnx_path: str | os.PathLike[str] | None = None,
        input_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dummy_input: Any = None,
    ) -> None:
        """Save the plain state dict (pruned weights zero), the masks, and optionally an ONNX file.

        The model stays wrapped afterwards; each file is written atomically.
        """
        if not self._masks:
            raise RuntimeError(f"{type(self).__name__}.export_model: call compress() first")
        if onnx_path is not None and input_shape is None and dummy_input is None:
            raise ValueError("export_model: onnx_path needs input_shape (or dummy_input)")
        was_wrapped = self._wrapped
        self._unwrap()
        try:
            atomic_torch_save(self.model.state_dict(), model_path)
            log.info("model state dict saved to %s", model_path)
            if mask_path is not None:
                save_masks(self._masks, mask_path)
                log.info("masks saved to %s", mask_path)
            if onnx_path is not None:
                self._export_onnx(Path(onnx_path), input_shape, device, dummy_input)
        finally:
            if was_wrapped:
                self._wrap()

    def _export_onnx(self, path: Path, input_shape: Sequence[int] | None, device: Any, dummy_input: Any) -> None:
        if dummy_input is None:
            assert input_shape is not None
            dummy_input = torch.randn(*input_shape, device=device)
        if isinstance(dummy_input, Mapping):  # keyed by forward's parameter names
            from ..graph.trace import as_input_tuple

            args = as_input_tuple(dummy_input, self.model)
        else:
            args = dummy_input if isinstance(dummy_input, tuple) else (dummy_input,)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        was_training = self.model.training
        self.model.eval()
        try:
            # the TorchScript exporter, as deploycompress.export uses: seconds faster than dynamo
            # for the same graph; ``deploycompress.export.to_onnx`` does the full job (names, QDQ)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its deprecation notice
                torch.onnx.export(self.model, args, str(tmp), dynamo=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            self.model.train(was_training)
        log.info("ONNX model saved to %s", path)


def _refuse_linear_like(modules: Mapping[str, nn.Module], algorithm: str) -> None:
    """Linear-like layers stored ``(in, out)`` (transformers' Conv1D) are pruned in their nn.Linear form."""
    from ..linear_like import is_linear_like

    found = [f"{n} ({type(m).__name__})" for n, m in modules.items() if is_linear_like(m)]
    if found:
        raise ConfigError(
            f"{algorithm}: {found[:4]}{' ...' if len(found) > 4 else ''} store their weight as (in, out) and compute "
            "torch.addmm on a view, which the channel tracer does not follow; prune their exact nn.Linear form: "
            "model = deploycompress.linear_like.to_linear(model) (a copy, same module names and outputs)"
        )

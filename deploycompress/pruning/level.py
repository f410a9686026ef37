"""Fine-grained pruning: each weight element is a unit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ModuleConfig
from .allocate import lowest, prune_count
from .base import Pruner
from .io import _bias, _weight, weight_attrs

__all__ = ["ElementPruner", "LevelPruner", "element_masks"]


class ElementPruner(Pruner):
    """Base for fine-grained pruners: override ``weight_score`` (higher = more worth keeping).

    Biases are never pruned element-wise (their mask is all True), as in NNI.
    """

    supported_op_types = None

    def weight_score(self, weight: torch.Tensor, config: ModuleConfig, **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def calc_mask(self, weight: torch.Tensor, config: ModuleConfig, **kw: Any) -> torch.Tensor:
        """The keep-mask for one weight at ``config.sparsity`` (or ``sparsity=`` in ``kw``)."""
        sparsity = kw.pop("sparsity", config.sparsity)
        if sparsity is None:
            raise ValueError(f"calc_mask for {config.name!r}: no per-layer sparsity (total_sparsity is allocated by compress())")
        score = self.weight_score(weight, config, **kw)
        return ~lowest(score, prune_count(sparsity, score.numel(), config.sparse_rounding))

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        weight = _weight(module)
        assert weight is not None
        return self.weight_score(weight.detach(), config, name=name, module=module)

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        return element_masks(module, ~pruned)


def element_masks(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fine-grained masks: ``keep`` for the weight, the bias (if any) all kept, as NNI does."""
    w_attr, b_attr = weight_attrs(module)
    masks = {w_attr: keep}
    bias = _bias(module)
    if bias is not None:
        masks[b_attr] = torch.ones_like(bias, dtype=torch.bool)
    return masks


class LevelPruner(ElementPruner):
    """Prune the weights of smallest magnitude (NNI's LevelPruner)."""

    default_op_types = ("Conv1d", "Conv2d", "Conv3d", "Linear", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        super().__init__(model, config_list)

    def weight_score(self, weight: torch.Tensor, config: ModuleConfig, **kw: Any) -> torch.Tensor:
        return weight.abs()

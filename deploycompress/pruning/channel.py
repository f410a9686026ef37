"""Output-channel pruning: what every structured pruner shares.

A unit is one output channel (dim 0 of a Conv/Linear weight, dim 1 of a ConvTranspose weight);
pruning it masks the whole filter and its bias entry. Subclasses only implement ``channel_score``.

With ``dependency_aware=True`` the channels of layers whose outputs are coupled (e.g. added in a
residual block, shuffled and concatenated in ShuffleNetV2, read by a depthwise conv) are pruned
together, so speedup can actually remove them. A coupled group's channels fall into classes
(*slots*, see ``deploycompress.graph.ChannelGroup``): the selected members' channel scores are
summed per slot, whole slots are pruned lowest first while no member loses more channels than its
own count, then each layer prunes its extra channels on its own score. Chunk/split pieces and the
filter groups of a grouped conv that reads the channels lose equal counts.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from ..config import ConfigError, ModuleConfig
from ..errors import user_stacklevel
from .allocate import CoupledUnits, lowest, lowest_slots
from .base import Pruner
from .io import Masks, _bias, _weight, weight_attrs

if TYPE_CHECKING:
    from ..graph import ChannelGroup

__all__ = ["ChannelPruner", "PruningWarning", "channel_dim", "channel_masks", "channel_rows"]


class PruningWarning(UserWarning):
    """A pruner's masks leave out something deployment would need (named in the message)."""

log = logging.getLogger(__name__)

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def channel_dim(module: nn.Module) -> int:
    """The weight dim that indexes output channels."""
    return 1 if isinstance(module, _CONV_TRANSPOSE) else 0


def channel_rows(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The weight as ``[channels, everything else]``."""
    return weight.detach().transpose(0, dim).reshape(weight.shape[dim], -1)


def channel_masks(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks that keep the output channels ``keep`` (bool) whole: filter rows and bias entries, under the
    names the module stores them (``weight``/``bias``, or an attention's ``in_proj_weight``/``in_proj_bias``)."""
    weight, bias = _weight(module), _bias(module)
    if weight is None:
        raise ValueError(f"{type(module).__name__} has no weight whose output channels could be masked")
    w_attr, b_attr = weight_attrs(module)
    shape = [1] * weight.dim()
    shape[channel_dim(module)] = -1
    masks = {w_attr: keep.reshape(shape).expand_as(weight).clone()}
    if bias is not None:
        masks[b_attr] = keep.clone()
    return masks


class ChannelPruner(Pruner):
    """Base for structured pruners: override ``channel_score`` (one score per output channel,
    higher = more worth keeping)."""

    honours_dependency_groups = True

    supported_op_types: tuple[str, ...] | None = (
        "Conv1d", "Conv2d", "Conv3d", "Linear", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
        "MultiheadAttention",  # units: rows of the packed q/k/v projection; dependency-aware: whole heads
    )

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]],
        *,
        dependency_aware: bool = False,
        dummy_input: Any = None,
        mode: str | None = None,
    ) -> None:
        """``mode`` is NNI 2.x's spelling: ``'dependency_aware'`` or ``'normal'``."""
        if mode is not None:
            if mode not in ("normal", "dependency_aware"):
                raise ValueError(f"{type(self).__name__}: mode must be 'normal' or 'dependency_aware', got {mode!r}")
            dependency_aware = dependency_aware or mode == "dependency_aware"
        super().__init__(model, config_list)
        for name, module in self._modules.items():
            if isinstance(module, _CONV_TRANSPOSE) and module.groups > 1:
                raise ConfigError(
                    f"config_list[{self.module_configs[name].config_index}] selects {name!r}, a grouped "
                    f"{type(module).__name__}: its output channels cannot be pruned as whole filters"
                )
        if dependency_aware and dummy_input is None:
            raise ValueError(f"{type(self).__name__}: dependency_aware=True needs dummy_input (an example input batch)")
        coupled = [n for n, c in self.module_configs.items() if c.dependency_group_id is not None]
        if coupled and not dependency_aware:
            raise ConfigError(
                f"config_list gives NNI 3.0 dependency_group_id to {coupled[:4]}: here coupled channels are found in "
                "the traced graph; pass dependency_aware=True and dummy_input (an example batch)"
            )
        self.dependency_aware = dependency_aware
        self.dummy_input = dummy_input
        self._channel_groups = self._build_channel_groups() if dependency_aware else []

    def channel_score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        raise NotImplementedError

    def _score(self, name: str, module: nn.Module, config: ModuleConfig) -> torch.Tensor:
        score = self.channel_score(name, module, config).detach().float().reshape(-1)
        weight = _weight(module)
        assert weight is not None
        expected = weight.shape[channel_dim(module)]
        if score.numel() != expected:
            raise RuntimeError(f"{type(self).__name__}: {score.numel()} scores for {name!r}, which has {expected} channels")
        return score

    def _expand(self, name: str, module: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        return channel_masks(module, ~pruned)

    def _joined(self, masks: Masks) -> Masks:
        """Also mask what speedup removes with the pruned channels (``speedup.joined_masks``): norm
        affine parameters, downstream biases and scales, class token and position-embedding rows, the
        rows of removed heads and the filters feeding exactly-zero norm channels. Needs ``dummy_input``;
        without it only the selected modules are masked and speedup keeps channels whose masked value
        is not zero (a BatchNorm bias behind them), which a ``PruningWarning`` says once."""
        if self.dummy_input is None:
            warnings.warn(
                f"{type(self).__name__}: no dummy_input, so the parameters joined to the pruned channels (BatchNorm "
                "affine, biases, class token, ...) are not masked; speedup keeps channels they make non-zero. "
                "Pass dummy_input=<example batch> to mask them too.",
                PruningWarning,
                stacklevel=3,
            )
            return masks
        from ..speedup.joined import joined_masks  # pruning may import speedup; lazily: speedup is heavier

        was_training = self.model.training
        try:
            joined = joined_masks(self.model, masks, self.dummy_input)
        except Exception as exc:  # noqa: BLE001 - the masks stand without the joined ones; say so
            warnings.warn(
                f"{type(self).__name__}: could not trace the model on dummy_input to mask the joined parameters "
                f"({type(exc).__name__}: {exc}); only the selected modules are masked",
                PruningWarning,
                stacklevel=3,
            )
            return masks
        finally:
            self.model.train(was_training)
        extra = sorted(f"{m}.{p}" for m, per in joined.items() for p in per if p not in masks.get(m, {}))
        if extra:
            log.info("%s: also masks %d joined tensors: %s", type(self).__name__, len(extra), ", ".join(extra[:10]))
        self._warn_unselected_filters(joined)
        return joined

    def _warn_unselected_filters(self, joined: Masks) -> None:
        """Say when the joined masks remove filters of a layer the config_list does not select: the producer of a
        selected depthwise conv's input channels (the conv passes them on, so they go from both), whose weights
        a ``total_sparsity`` budget does not count."""
        if not any(isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 for m in self._modules.values()):
            return  # only a grouped conv passes its input channels on (a BatchNorm's conv, e.g. SlimPruner's, is meant)
        hit = []
        for name, per in joined.items():
            w = per.get("weight")
            module = self.model.get_submodule(name)
            if name in self._modules or w is None or w.dim() < 2 or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            rows = int((~w.reshape(w.shape[0], -1).any(1)).sum())
            if rows:
                hit.append(f"{name} ({rows} of {w.shape[0]})")
        if hit:
            warnings.warn(
                f"{type(self).__name__}: the masks also remove output channels of layers the config_list does not select: "
                f"{', '.join(hit[:5])}{' ...' if len(hit) > 5 else ''}; they feed the selected channels one to one (a depthwise "
                "conv passes its input channels on), so the channels go from both. Their weights are not counted in a "
                "total_sparsity budget; select these layers too to count them",
                PruningWarning,
                stacklevel=user_stacklevel(),
            )

    # ------------------------------------------------------------------ dependency-aware selection
    def _build_channel_groups(self) -> list[ChannelGroup]:
        try:
            from ..graph import build_channel_groups  # type: ignore[attr-defined]
        except ImportError as exc:
            raise ImportError(
                "dependency_aware=True needs deploycompress.graph.build_channel_groups, "
                "which this installation does not provide"
            ) from exc
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = self.dummy_input if isinstance(self.dummy_input, (tuple, Mapping)) else (self.dummy_input,)
            groups = list(build_channel_groups(self.model, inputs))
        finally:
            self.model.train(was_training)
        for group in groups:
            for name in group.modules:
                if name in self._modules:
                    weight = _weight(self._modules[name])
                    assert weight is not None
                    n = weight.shape[channel_dim(self._modules[name])]
                    expected = group.slots[name].numel()
                    if n != expected:
                        raise RuntimeError(f"channel group {group.modules} gives {name!r} {expected} channels but it has {n}")
        return groups

    def _coupled_units(self, names: list[str], scores: dict[str, torch.Tensor]) -> list[CoupledUnits]:
        """Each dependency group's members in this budget, ranked by slot on the summed score (the score the
        selection below prunes a group by) and counted at the weights of every member: the budget is then spent
        on whole slots, which speedup removes, rather than on one member's channels that a partner keeps."""
        coupled, kept = [], []
        for group in self._channel_groups:
            members = [n for n in group.modules if n in names]
            if not members:
                continue
            # channels summed from several sources (a residual add) go only when every source prunes them
            sources = [n for n in group.modules if n not in group.followers]
            outside = [n for n in sources if n not in self._modules] if len(sources) > 1 else []
            # a norm's pin holds under speedup's default norm_spans='keep' only: such channels stay candidates
            removable = (not group.pinned or group.norm_pinned) and not outside
            alone = len(members) == 1 and torch.equal(group.slots[members[0]], torch.arange(group.num_slots))
            if removable and alone and not group.balances:
                continue  # a layer on its own: its channels are the units
            fused, sizes = _slot_scores(group, members, scores)
            coupled.append(CoupledUnits(members, fused, sizes, group.balances, removable))
            if not removable:
                why = (f"they are added to the outputs of {outside[:3]}, which the config_list does not select" if outside
                       else "they reach the model output, or an op without a channel rule")
                kept.append(f"{members[:3]}{' ...' if len(members) > 3 else ''} ({why})")
        if kept:
            warnings.warn(
                f"{type(self).__name__}: total_sparsity prunes no output channels of {'; '.join(kept)}: speedup keeps them; the "
                "budget is spent on the other selected layers (these still count in its total). Select the whole coupled "
                "group, or leave these layers out of the config_list",
                PruningWarning,
                stacklevel=user_stacklevel(),
            )
        return coupled

    def _select(self, scores: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        pruned: dict[str, torch.Tensor] = {}
        for group in self._channel_groups:
            members = [n for n in group.modules if n in scores and n not in pruned]
            if members:
                pruned.update(_select_group(group, members, scores, counts))
        for name, s in scores.items():
            if name not in pruned:
                pruned[name] = lowest(s, counts[name])
        return pruned


def _slot_scores(group: ChannelGroup, members: list[str], scores: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's slot scores (the members' channel scores summed per slot) and ``sizes[i, s]``, the channels
    member ``members[i]`` has in slot ``s``."""
    fused = torch.zeros(group.num_slots)
    for n in members:
        fused.index_add_(0, group.slots[n], scores[n].float())
    sizes = torch.stack([torch.bincount(group.slots[n], minlength=group.num_slots) for n in members])
    return fused, sizes


def _select_group(group: ChannelGroup, members: list[str], scores: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Whole slots on the summed score first, then each member's extra channels on its own score."""
    slots = {n: group.slots[n] for n in members}
    num_slots = group.num_slots
    fused, sizes = _slot_scores(group, members, scores)
    shared = lowest_slots(fused, sizes, [counts[n] for n in members], group.balances)
    # Extra channels are not whole classes, so speedup keeps them whatever they are; only in an
    # aligned group (channel i is slot i) do they keep a grouped consumer's filter groups even.
    aligned = all(torch.equal(s, torch.arange(num_slots)) for s in slots.values())
    own = group.balances if aligned else []
    pruned: dict[str, torch.Tensor] = {}
    for n in members:
        together = shared[slots[n]]
        extra = counts[n] - int(together.sum())
        rest = lowest_slots(scores[n], torch.ones(1, slots[n].numel(), dtype=torch.long), [extra], own, together)
        pruned[n] = together | rest
    if len(members) > 1:
        log.info(
            "coupled channels %s: %d of %d channel classes pruned together (%s channels per member)",
            members, int(shared.sum()), num_slots, [int(shared[slots[n]].sum()) for n in members],
        )  # fmt: skip
    return pruned

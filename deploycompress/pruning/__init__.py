"""Simulated pruning: NNI-style pruners that compute masks and apply them in the forward pass."""

from .activation import ActivationAPoZRankPruner, ActivationMeanRankPruner
from .base import Pruner
from .channel import ChannelPruner
from .evaluator import TorchEvaluator
from .io import apply_masks, load_masks, save_masks
from .level import ElementPruner, LevelPruner
from .norm import FPGMPruner, L1NormPruner, L2NormPruner
from .random_masks import group_keep, random_group_masks
from .slim import SlimPruner
from .taylor import TaylorFOWeightPruner

__all__: list[str] = [
    "Pruner",
    "ElementPruner",
    "ChannelPruner",
    "LevelPruner",
    "L1NormPruner",
    "L2NormPruner",
    "FPGMPruner",
    "SlimPruner",
    "ActivationAPoZRankPruner",
    "ActivationMeanRankPruner",
    "TaylorFOWeightPruner",
    "TorchEvaluator",
    "save_masks",
    "load_masks",
    "apply_masks",
    "group_keep",
    "random_group_masks",
]

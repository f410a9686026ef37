"""Simulated pruning: NNI-style pruners that compute masks and apply them in the forward pass."""

from .base import Pruner
from .io import apply_masks, load_masks, save_masks
from .level import LevelPruner
from .norm import FPGMPruner, L1NormPruner, L2NormPruner

__all__: list[str] = [
    "Pruner",
    "LevelPruner",
    "L1NormPruner",
    "L2NormPruner",
    "FPGMPruner",
    "save_masks",
    "load_masks",
    "apply_masks",
]

"""Simulated pruning: NNI-style pruners that compute masks and apply them in the forward pass."""

from .activation import ActivationAPoZRankPruner, ActivationMeanRankPruner
from .base import Pruner
from .channel import ChannelPruner
from .evaluator import TorchEvaluator
from .io import apply_masks, load_masks, save_masks
from .iterative import AGPPruner, IterativePruner, LinearPruner, LotteryTicketPruner
from .level import ElementPruner, LevelPruner
from .scheduler import PruningScheduler, TaskGenerator
from .task_generator import AGPTaskGenerator, LinearTaskGenerator, LotteryTicketTaskGenerator
from .admm import ADMMPruner
from .movement import MovementPruner
from .autocompress import AutoCompressPruner
from .amc import AMCPruner
from .annealing import SimulatedAnnealingPruner
from .netadapt import BudgetNotReached, NetAdaptPruner
from .search import Trajectory, trajectory_plot
from .resources import LookupTable, ResourceMeter
from .sensitivity import SensitivityAnalysis, SensitivityResult, sensitivity_analysis
from .executor import InProcessExecutor, RayExecutor
from .recipe import make_recipe_pruner, run_prune_section, write_search_report
from .norm import FPGMPruner, L1NormPruner, L2NormPruner
from .random_masks import group_keep, random_group_masks, random_layer_masks
from .slim import SlimPruner
from .taylor import TaylorFOWeightPruner
from .taylor_gate import TaylorGatePruner
from .reconstruction_select import ReconstructionPruner

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
    "TaylorGatePruner",
    "ReconstructionPruner",
    "TorchEvaluator",
    "PruningScheduler",
    "TaskGenerator",
    "LinearTaskGenerator",
    "AGPTaskGenerator",
    "LotteryTicketTaskGenerator",
    "IterativePruner",
    "LinearPruner",
    "AGPPruner",
    "LotteryTicketPruner",
    "NetAdaptPruner",
    "ADMMPruner",
    "MovementPruner",
    "AutoCompressPruner",
    "AMCPruner",
    "SimulatedAnnealingPruner",
    "ResourceMeter",
    "BudgetNotReached",
    "Trajectory",
    "trajectory_plot",
    "LookupTable",
    "SensitivityAnalysis",
    "SensitivityResult",
    "sensitivity_analysis",
    "InProcessExecutor",
    "RayExecutor",
    "make_recipe_pruner",
    "run_prune_section",
    "write_search_report",
    "save_masks",
    "load_masks",
    "apply_masks",
    "group_keep",
    "random_group_masks",
    "random_layer_masks",
]

"""deploycompress: compress a PyTorch model and ship it as a serving-ready engine.

Each subpackage declares its public names in ``__all__``; they are re-exported here so users
write ``import deploycompress as dc; dc.L1NormPruner(...)``.
"""

from importlib import import_module as _import_module

from . import backends, bundle, config, export, graph, pruning, quantization, report, speedup, validate
from .backends import *  # noqa: F401,F403
from .bundle import *  # noqa: F401,F403
from .errors import DeployCompressError, InputError, MaskError, StepError
from .config import ConfigConventionWarning, ConfigError, ModuleConfig, select_modules, validate_config_list
from .counting import FlopsParams, LayerCount, count_flops_params
from .export import *  # noqa: F401,F403
from .graph import *  # noqa: F401,F403
from .pruning import *  # noqa: F401,F403
from .quantization import *  # noqa: F401,F403
from .report import *  # noqa: F401,F403
from . import speedup as _speedup_pkg  # the star import below rebinds `speedup` to the function
from .speedup import *  # noqa: F401,F403
from .validate import *  # noqa: F401,F403
from .engine import BuildStepError, EngineArtifact, EngineError, build_engine  # noqa: E402

__version__ = "0.1.0"

__all__ = (
    ["DeployCompressError", "InputError", "StepError", "MaskError"]
    + ["ConfigConventionWarning", "ConfigError", "ModuleConfig", "select_modules", "validate_config_list", "__version__"]
    + ["FlopsParams", "LayerCount", "count_flops_params"]
    + backends.__all__
    + bundle.__all__
    + export.__all__
    + graph.__all__
    + pruning.__all__
    + quantization.__all__
    + report.__all__
    + _speedup_pkg.__all__
    + _import_module(f"{__name__}.validate").__all__  # the function validate() shadows the subpackage
    + ["BuildStepError", "EngineArtifact", "EngineError", "build_engine"]
)

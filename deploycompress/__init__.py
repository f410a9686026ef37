"""deploycompress: compress a PyTorch model and ship it as a serving-ready engine.

Each subpackage declares its public names in ``__all__``; they are re-exported here so users
write ``import deploycompress as dc; dc.L1NormPruner(...)``.
"""

from . import backends, bundle, config, export, graph, pruning, quantization, report, speedup, validate
from .backends import *  # noqa: F401,F403
from .bundle import *  # noqa: F401,F403
from .config import ConfigError, ModuleConfig, select_modules, validate_config_list
from .counting import FlopsParams, LayerCount, count_flops_params
from .export import *  # noqa: F401,F403
from .graph import *  # noqa: F401,F403
from .pruning import *  # noqa: F401,F403
from .quantization import *  # noqa: F401,F403
from .report import *  # noqa: F401,F403
from .speedup import *  # noqa: F401,F403
from .validate import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = (
    ["ConfigError", "ModuleConfig", "select_modules", "validate_config_list", "__version__"]
    + ["FlopsParams", "LayerCount", "count_flops_params"]
    + backends.__all__
    + bundle.__all__
    + export.__all__
    + graph.__all__
    + pruning.__all__
    + quantization.__all__
    + report.__all__
    + speedup.__all__
    + validate.__all__
)

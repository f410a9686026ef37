"""The one base class of every quantizer: selection, wrapping, hooks, calibration export.

A new quantizer overrides :meth:`Quantizer.quantize_weight` (and ``quantize_input`` /
``quantize_output``) and :meth:`Quantizer.calibration`; wrapping, config checks, CalibConfig export,
``export_model`` and ``unwrap_model`` come from here.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from calibrators import MinMaxCalibrator, QuantError, QuantParams

from ..errors import InputError
from ..config import ConfigError, ModuleConfig, select_modules, validate_config_list
from .calib_config import CalibConfig
from .fake_quant import fake_quantize
from .wrapper import QuantWrapper

__all__ = ["LEFT_FLOAT_KEY", "Quantizer", "QuantizerError", "WEIGHTED_OP_TYPES", "ACTIVATION_OP_TYPES"]

log = logging.getLogger(__name__)

WEIGHTED_OP_TYPES = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "Linear",
)
#: modules whose input/output (not weight) may be quantized
ACTIVATION_OP_TYPES = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "GELU",
    "SiLU",
    "Hardswish",
    "Hardtanh",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Flatten",
    "Identity",
)


#: the calibration provenance key listing the selected modules left float, ``{module: reason}``
LEFT_FLOAT_KEY = "left_float"


class QuantizerError(InputError, ValueError):
    """A quantizer used out of order or asked for something it cannot give; the message names the module."""


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _atomic_write(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Quantizer:
    """Wraps the modules a config_list selects and simulates their quantization in place.

    Class attributes say what a variant supports: ``min_bits`` (1 only for binary methods),
    ``default_granularity`` for weights when a config does not name one, ``weight_only``.
    """

    algorithm = "Quantizer"
    default_op_types: Sequence[str] = WEIGHTED_OP_TYPES
    supported_op_types: Sequence[str] = WEIGHTED_OP_TYPES + ACTIVATION_OP_TYPES
    min_bits = 2
    default_granularity = "per_tensor"
    supported_quant_types: tuple[str, ...] = ("weight", "input", "output")
    #: whether a config's ``quant_start_step`` (NNI 2.x QAT) means something to this quantizer
    takes_start_step = False

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]]) -> None:
        self.model = model
        configs = select_modules(
            model,
            config_list,
            kind="quantization",
            default_op_types=self.default_op_types,
            supported_op_types=self.supported_op_types,
            algorithm=self.algorithm,
        )
        explicit = validate_config_list(config_list, kind="quantization")
        #: modules the config selected that stay float, with the reason (recorded in the calibration's
        #: provenance as ``left_float``, reported by the precision audit as named exceptions)
        self.left_float: dict[str, str] = {}
        configs = _drop_uncalled(model, configs, self.left_float)
        for name, cfg in configs.items():
            self._check(name, cfg, model.get_submodule(name))
            if "granularity" not in explicit[cfg.config_index]:
                cfg.granularity = self.default_granularity
        self.module_configs: dict[str, ModuleConfig] = configs
        self.wrappers: dict[str, QuantWrapper] = {
            name: QuantWrapper(model.get_submodule(name), cfg, self) for name, cfg in configs.items()
        }
        self._wrapped = False
        self.wrap_model()

    def _check(self, name: str, cfg: ModuleConfig, module: nn.Module) -> None:
        where = f"config_list[{cfg.config_index}] ({self.algorithm}) on module {name!r}"
        for kind in cfg.quant_types:
            if kind not in self.supported_quant_types:
                raise ConfigError(
                    f"{where}: quant_type {kind!r} is not supported; {self.algorithm} quantizes "
                    f"{list(self.supported_quant_types)}"
                )
            if cfg.quant_bits[kind] < self.min_bits:
                raise ConfigError(
                    f"{where}: quant_bits[{kind!r}] = {cfg.quant_bits[kind]} is below the {self.min_bits}-bit minimum"
                )
        if cfg.quant_start_step is not None and not self.takes_start_step:
            raise ConfigError(f"{where}: 'quant_start_step' is NNI 2.x QAT's key; {self.algorithm} has no start step")
        if "weight" in cfg.quant_types and not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise ConfigError(f"{where}: quant_type 'weight' given, but {type(module).__name__} has no weight")

    # -- wrapping -----------------------------------------------------------------------------------
    def wrap_model(self) -> None:
        if self._wrapped:
            return
        for name, wrapper in self.wrappers.items():
            _set_submodule(self.model, name, wrapper)
        self._wrapped = True

    def unwrap_model(self, *, bake: bool = False) -> nn.Module:
        """Put the plain modules back. ``bake=True`` writes the simulated (quantized) weights into them,
        which is what deployment needs for quantizers whose weight is a transform (DoReFa, BNN)."""
        if bake:
            with torch.no_grad():
                for wrapper in self.wrappers.values():
                    if "weight" in wrapper.quant_types:
                        wrapper.weight.copy_(self.deploy_weight(wrapper))
        for name, wrapper in self.wrappers.items():
            _set_submodule(self.model, name, wrapper.module)
        self._wrapped = False
        return self.model

    # -- hooks a quantizer overrides ----------------------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return weight

    def quantize_input(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return x

    def quantize_output(self, x: torch.Tensor, wrapper: QuantWrapper) -> torch.Tensor:
        return x

    def calibration(self, wrapper: QuantWrapper, kind: str) -> QuantParams:
        """The parameters the deployed graph must use for ``wrapper``'s ``kind`` tensor."""
        params = wrapper.params.get(kind)
        if params is None:
            raise QuantizerError(f"{wrapper.name}.{kind} has no calibration yet: {self._missing_hint()}")
        return params

    def _missing_hint(self) -> str:
        return "run the model on data first"

    def deploy_weight(self, wrapper: QuantWrapper) -> torch.Tensor:
        """The weight a deployed model holds: the simulated one, on the exported grid (re-quantizing it is exact)."""
        with torch.no_grad():
            simulated = self.quantize_weight(wrapper.weight.detach(), wrapper)
            return fake_quantize(simulated, self.calibration(wrapper, "weight"))

    def step(self) -> None:
        """Called after each optimizer step (training-aware quantizers count steps)."""

    def update_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch."""

    # -- shared arithmetic --------------------------------------------------------------------------
    @staticmethod
    def weight_params(wrapper: QuantWrapper, weight: torch.Tensor | None = None) -> QuantParams:
        """Min/max parameters of the current weight, per channel when the granularity says so."""
        w = wrapper.weight if weight is None else weight
        cal = MinMaxCalibrator(
            bits=wrapper.bits("weight"),
            signed=wrapper.signed,
            symmetric=wrapper.symmetric,
            axis=wrapper.axis("weight"),
            name=f"{wrapper.name}.weight",
        )
        try:
            cal.observe(w.detach().float().cpu().numpy())
            return cal.compute()
        except QuantError as exc:
            raise QuantizerError(str(exc)) from None

    # -- export -------------------------------------------------------------------------------------
    def export_calib_config(self) -> CalibConfig:
        """One :class:`CalibConfig` entry per quantized tensor, keyed by the model's module names."""
        calib = CalibConfig(producer=f"deploycompress {self.algorithm}")
        if self.left_float:
            calib.provenance[LEFT_FLOAT_KEY] = dict(self.left_float)
        for name, wrapper in self.wrappers.items():
            for kind in wrapper.quant_types:
                calib.set(name, kind, self.calibration(wrapper, kind))
        return calib

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the unwrapped model (module names as in the original), weights baked."""
        baked = {
            f"{name}.weight": self.deploy_weight(w).clone()
            for name, w in self.wrappers.items()
            if "weight" in w.quant_types
        }
        was_wrapped = self._wrapped
        self.unwrap_model()
        try:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        finally:
            if was_wrapped:
                self.wrap_model()
        state.update(baked)
        return state

    def export_model(self, model_path: str | os.PathLike[str], calibration_path: str | os.PathLike[str] | None = None) -> CalibConfig:
        """Write the deployable weights (``torch.save`` state dict, plain module names) and the calibration.

        Both are computed before anything is written, and each file is written atomically.
        """
        calib = self.export_calib_config()
        state = self.plain_state_dict()
        _atomic_write(Path(model_path), lambda tmp: torch.save(state, tmp))
        if calibration_path is not None:
            calib.save(calibration_path)
        log.info("%s: wrote %s%s", self.algorithm, model_path, f" and {calibration_path}" if calibration_path else "")
        return calib


class UncalledModuleWarning(UserWarning):
    """A selected module is never called: its parent reads its parameters directly (the ``out_proj``
    of ``nn.MultiheadAttention``), so it is not wrapped and stays float."""


def _uncalled_modules(model: nn.Module) -> set[str]:
    """Modules whose parent reads their weight and bias instead of calling them: torch's
    ``nn.MultiheadAttention`` passes ``out_proj.weight``/``out_proj.bias`` to
    ``F.multi_head_attention_forward`` (torch/nn/modules/activation.py), so a wrapper there breaks it."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear)
    }


#: why a selected out_proj stays float (the precision audit's exception reason)
UNCALLED_REASON = ("never called: nn.MultiheadAttention passes out_proj.weight/bias to F.multi_head_attention_forward, "
                   "so no quantizer wrapper can see its input; it stays float in the simulation and the deployed graph")


def _drop_uncalled(model: nn.Module, configs: dict[str, ModuleConfig], left_float: dict[str, str]) -> dict[str, ModuleConfig]:
    skipped = sorted(_uncalled_modules(model) & set(configs))
    left_float.update({n: UNCALLED_REASON for n in skipped})
    if skipped:
        warnings.warn(
            f"{skipped}: never called (nn.MultiheadAttention reads out_proj's weight directly), so not "
            "quantized; they stay float in the simulation and the deployed graph",
            UncalledModuleWarning,
            stacklevel=3,
        )
    return {n: c for n, c in configs.items() if n not in skipped}


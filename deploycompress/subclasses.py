"""What a layer subclass computes, checked against its base class on an example input.

Real models are built from subclasses of ``nn.Conv2d``/``nn.Linear`` whose ``forward`` is not the base's:
EfficientNet-Lite's ``Conv2dStaticSamePadding`` and timm's ``Conv2dSame`` pad the input first, timm's
``StdConv2d`` standardises its weight, others scale the output. Selection treats them as their base
(``op_types`` match by ``isinstance``); this module says what each one really computes, so every later
step can follow it or refuse it by name, never treat it as its base silently.

The forward runs once on the layer's own input from the example inputs, under a
:class:`torch.overrides.TorchFunctionMode` that records the base operation it calls (``conv2d``,
``linear``, ...) with its actual input, weight and bias. Forms (``LayerForm.kind``):

* ``base``: the base class's forward gives the same output;
* ``padded``: the base operation on a zero-padded copy of the input, with the module's own weight
  (static or dynamic TensorFlow-style "SAME" padding);
* ``epilogue``: the base operation on the (padded) input with the module's own weight, followed by
  something else (an output scale, ...): input and weight quantize as the base's, the rest stays the
  subclass's forward;
* ``weight_transform``: the base operation on a weight computed from the parameters (weight
  standardisation): deployment bakes that effective weight into a plain base layer (:func:`lower_layers`).

Anything else (no base call or several, a weight that depends on the input, an input that is not
the layer's input zero-padded, a transformed weight followed by more work) raises :class:`SubclassError`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import InputError
from .config import op_class_of

__all__ = [
    "BASE_LAYERS", "LayerForm", "LayerLoweredWarning", "SubclassError", "analyse_layer", "analyse_layers", "follow_subclasses",
    "lower_layers", "is_subclass_layer",
]

log = logging.getLogger(__name__)

#: base class -> the functional its forward calls (by ``__name__``, as TorchFunctionMode sees it)
BASE_LAYERS: dict[type, str] = {
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d",
    nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
    nn.Linear: "linear",
}
KINDS = ("base", "padded", "epilogue", "weight_transform")


class LayerLoweredWarning(UserWarning):
    """A layer subclass was replaced by its base class holding its effective weight (the model's classes changed)."""


class SubclassError(InputError, ValueError):
    """A layer subclass whose forward is not a form deploycompress follows; names the module and why."""


@dataclass(frozen=True)
class LayerForm:
    """What one layer subclass computes (see the module docstring for the kinds)."""

    name: str
    cls: str
    base: str
    kind: str
    pads: tuple[int, ...] = ()  # zero padding in F.pad order (last dimension first)
    max_abs_error: float = 0.0  # |forward - rebuilt base computation| on the example input

    def describe(self) -> str:
        pads = f", zero pads {list(self.pads)}" if self.pads else ""
        return f"{self.name} ({self.cls}, a {self.base}): {self.kind}{pads}"


def _base_of(module: nn.Module) -> type | None:
    for base in op_class_of(module).__mro__:
        if base in BASE_LAYERS:
            return base
    return None


def is_subclass_layer(module: nn.Module) -> bool:
    """A weighted layer (Conv/ConvTranspose/Linear) whose class is not the torch class itself."""
    base = _base_of(module)
    return base is not None and op_class_of(module) is not base


class _Record(TorchFunctionMode):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.calls: list[tuple[tuple, dict, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", None) == self.op:
            self.calls.append((args, dict(kwargs), out))
        return out


def _call(module: nn.Module, op: str, inputs: tuple) -> tuple[Any, list]:
    rec = _Record(op)
    with torch.no_grad(), rec:
        out = module(*inputs)
    return out, rec.calls


def _find_zero_pad(padded: torch.Tensor, x: torch.Tensor) -> tuple[int, ...] | None:
    """Pads (F.pad order) such that ``padded == F.pad(x, pads)``, or None."""
    if padded.shape == x.shape:
        return () if torch.equal(padded, x) else None
    if padded.dim() != x.dim() or padded.shape[:2] != x.shape[:2] or any(p < s for p, s in zip(padded.shape, x.shape)):
        return None
    extra = [p - s for p, s in zip(padded.shape[2:], x.shape[2:])]
    for starts in itertools.product(*(range(e + 1) for e in extra)):
        pads: list[int] = []
        for start, e in reversed(list(zip(starts, extra))):
            pads += [start, e - start]
        if torch.equal(F.pad(x, pads), padded):
            return tuple(pads)
    return None


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any, tuple, dict]:
    inp = args[0] if args else kwargs.pop("input")
    weight = args[1] if len(args) > 1 else kwargs.pop("weight")
    bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
    return inp, weight, bias, tuple(args[3:]), {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}


def _base_forward(base: type, module: nn.Module, inputs: tuple, weight: torch.Tensor) -> torch.Tensor:
    """The base class's forward with ``weight`` in place of the module's own."""
    if base is nn.Linear:
        return F.linear(inputs[0], weight, module.bias)
    if issubclass(base, nn.modules.conv._ConvTransposeNd):
        lowered = copy.copy(module)
        lowered._parameters = {**module._parameters, "weight": weight}
        lowered.__class__ = base
        return lowered(*inputs)
    return base._conv_forward(module, inputs[0], weight, module.bias)


def analyse_layer(name: str, module: nn.Module, inputs: tuple) -> LayerForm:
    """The form of ``module`` on ``inputs`` (its own positional inputs in the example run).

    Raises :class:`SubclassError` naming the module when its forward is none of the forms followed.
    """
    base = _base_of(module)
    cls = op_class_of(module).__name__
    if base is None:
        raise SubclassError(f"module {name!r} ({cls}) is not a subclass of {[b.__name__ for b in BASE_LAYERS]}")
    op = BASE_LAYERS[base]
    where = f"module {name!r} ({cls}, a subclass of {base.__name__})"
    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor):
        raise SubclassError(f"{where}: its first input is not a tensor; cannot compare it with {base.__name__}")
    out, calls = _call(module, op, inputs)
    if len(calls) != 1:
        raise SubclassError(
            f"{where}: its forward calls {op} {len(calls)} times, not once; it is not {base.__name__}'s computation "
            f"and no rule covers it: exclude it from the config (exclude_op_names) or replace it"
        )
    args, kwargs, base_out = calls[0]
    inp, weight, bias, rest_args, rest_kwargs = _split(args, dict(kwargs))
    pads = _find_zero_pad(inp, x)
    if pads is None:
        raise SubclassError(
            f"{where}: its {op} does not run on its input (or a zero-padded copy of it): it transforms the input "
            f"first, which no rule covers; exclude it from the config (exclude_op_names) or replace it"
        )
    raw = torch.equal(weight, module.weight)
    epilogue = not (isinstance(out, torch.Tensor) and out.shape == base_out.shape and torch.equal(out, base_out))
    if not raw:
        if epilogue or pads:
            raise SubclassError(
                f"{where}: it transforms its weight and also {'changes the ' + op + ' output' if epilogue else 'pads its input'}; "
                "no rule covers both"
            )
        with torch.no_grad():
            plain = _base_forward(base, module, inputs, weight)
        if plain.shape != out.shape or not torch.equal(plain, out):
            raise SubclassError(f"{where}: it transforms its weight and calls {op} with arguments other than its own; no rule covers it")
        _, again = _call(module, op, (x.flip(0) * 0.5 + 0.25,) + tuple(inputs[1:]))
        if len(again) != 1 or not torch.equal(_split(again[0][0], dict(again[0][1]))[1], weight):
            raise SubclassError(f"{where}: the weight its {op} uses depends on the input; no rule covers it")
    # the rebuilt base computation: the functional on the zero-padded input, the recorded weight and arguments
    with torch.no_grad():
        rebuilt = getattr(F, op)(F.pad(x, list(pads)) if pads else x, weight, bias, *rest_args, **rest_kwargs)
    err = float((rebuilt - base_out).abs().max()) if rebuilt.shape == base_out.shape else float("inf")
    if err > 0:
        raise SubclassError(f"{where}: its {op} could not be rebuilt from its arguments (max |error| {err:.3g})")
    if not raw:
        kind = "weight_transform"
    elif epilogue:
        kind = "epilogue"
    else:
        with torch.no_grad():
            plain = base.forward(module, *inputs)
        kind = "base" if not pads and plain.shape == out.shape and torch.equal(plain, out) else "padded"
    if epilogue:
        err = float("nan")  # what follows the base op is the subclass's own; nothing to compare with
    form = LayerForm(name, cls, base.__name__, kind, tuple(pads), err)
    log.info("layer subclass %s", form.describe())
    return form


def analyse_layers(model: nn.Module, example_inputs: Any, names: Iterable[str] | None = None) -> dict[str, LayerForm]:
    """:func:`analyse_layer` for every layer subclass of ``model`` (or those of ``names``), each on its input
    from one run of ``example_inputs``. Raises :class:`SubclassError` naming every layer no rule covers."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    wanted = set(names) if names is not None else None
    layers = {
        n: m for n, m in model.named_modules()
        if n and is_subclass_layer(m) and (wanted is None or n in wanted) and ".parametrizations" not in f".{n}"
    }
    if not layers:
        return {}
    seen: dict[str, tuple] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, tuple(args)))
        for n, m in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    forms, errors = {}, []
    for n, m in layers.items():
        if n not in seen:
            continue  # never called on the example inputs: it produces nothing to follow
        try:
            forms[n] = analyse_layer(n, m, seen[n])
        except SubclassError as exc:
            errors.append(str(exc))
    if errors:
        raise SubclassError("layer subclasses no rule covers:\n  " + "\n  ".join(errors))
    return forms


_ZERO_PADDED: dict[type, type] = {}


def _zero_padded_class(base: type) -> type:
    """``ZeroPadded<Base>``: the base layer after a fixed zero padding (``self.pads``, F.pad order)."""
    if base not in _ZERO_PADDED:

        def forward(self, x):  # noqa: ANN001, ANN202
            return base.forward(self, F.pad(x, list(self.pads), "constant", 0.0))  # an explicit value: onnxruntime fuses the Pad then

        _ZERO_PADDED[base] = type(f"ZeroPadded{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    return _ZERO_PADDED[base]


def _as_class(module: nn.Module, cls: type) -> nn.Module:
    """A shallow copy of ``module`` (own parameter, buffer and child dicts) whose class is ``cls``."""
    out = copy.copy(module)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    out._modules = dict(module._modules)
    out.__class__ = cls
    return out


def lower_layers(
    model: nn.Module, forms: Mapping[str, LayerForm], *, kinds: Iterable[str] = ("weight_transform", "padded"), warn: bool = False
) -> list[str]:
    """Replace, in place, the layers of ``kinds`` whose forward an exported graph cannot keep static:

    * ``weight_transform``: a plain base layer holding the effective weight (exact at these weights; the
      transform is no longer trainable);
    * ``padded`` without submodules (padding computed in forward, timm's ``Conv2dSame``): ``ZeroPadded<Base>``
      with the pads found at the example input's size, so the graph holds a constant Pad (the exported
      graph's spatial size is that of the example input anyway).

    Returns the replaced module names."""
    kinds = tuple(kinds)
    done = []
    for name, form in forms.items():
        module = model.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if form.kind not in kinds:
            continue
        if form.kind == "padded" and not any(True for _ in module.children()):
            base = _base_of(module)
            padded = _as_class(module, _zero_padded_class(base))
            padded.pads = tuple(form.pads)
            setattr(parent, attr, padded)
            done.append(name)
            log.info("layer subclass %s: its padding is fixed at %s for the example input's size", name, list(form.pads))
            continue
        if form.kind != "weight_transform":
            continue  # a padding module inside (EfficientNet's static_padding) exports as a constant Pad already
        base = _base_of(module)
        assert base is not None
        op = BASE_LAYERS[base]
        # the effective weight does not depend on the input (checked): any input of the right shape gives it
        x = torch.zeros(_probe_shape(module), dtype=module.weight.dtype, device=module.weight.device)
        _, calls = _call(module, op, (x,))
        weight = _split(calls[0][0], dict(calls[0][1]))[1].detach().clone()
        plain = _as_class(module, base)  # the torch class's own forward from now on
        plain._parameters["weight"] = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        setattr(parent, attr, plain)
        done.append(name)
        log.info("layer subclass %s: its effective (transformed) weight is baked into a plain %s", name, base.__name__)
    baked = [n for n in done if forms[n].kind == "weight_transform"]
    if warn and baked:
        warnings.warn(
            f"{len(baked)} layer subclasses compute their weight in forward ({', '.join(baked[:5])}{', ...' if len(baked) > 5 else ''}): "
            "each became its base class holding that effective weight, which is exact at these weights",
            LayerLoweredWarning,
            stacklevel=3,
        )
    return done


def follow_subclasses(model: nn.Module, example_inputs: Any, *, warn: bool = False) -> dict[str, LayerForm]:
    """Analyse every layer subclass of ``model`` (:class:`SubclassError` for those no rule covers) and lower,
    in place, those that compute their weight (:func:`lower_layers`); the others keep their forward.
    Returns the forms found."""
    forms = analyse_layers(model, example_inputs)
    lower_layers(model, forms, kinds=("weight_transform",), warn=warn)
    return forms


def _probe_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (1, module.in_features)
    assert isinstance(module, nn.modules.conv._ConvNd)
    spatial = [max(1, (k - 1) * d + 1) for k, d in zip(module.kernel_size, module.dilation)]
    return (1, module.in_channels, *spatial)

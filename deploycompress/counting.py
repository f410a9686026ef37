"""FLOPs and parameter counts per layer, measured by running the model once.

FLOPs follow NNI's ``count_flops_params`` convention: multiply-accumulates per sample (the batch
dimension is divided out), biases add one per output element. Layers the counter has no rule for
still appear with their parameters and output shape, at 0 FLOPs. A masked (not yet sped-up)
model counts as dense: masks do not remove work until speedup shrinks the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["LayerCount", "FlopsParams", "count_flops_params"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid)


@dataclass
class LayerCount:
    """One leaf module; ``flops`` and ``calls`` add up over every call in the forward pass."""

    name: str
    op_type: str
    flops: int
    params: int
    output_shape: tuple[int, ...]
    calls: int = 1


@dataclass
class FlopsParams:
    """Totals and the per-layer table; unpacks like NNI's result: ``flops, params, layers = ...``."""

    flops: int
    params: int
    layers: list[LayerCount] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.flops, self.params, self.layers))

    def table(self) -> str:
        header = ("layer", "type", "FLOPs", "params", "output shape")
        rows = [
            (l.name, l.op_type + (f" x{l.calls}" if l.calls > 1 else ""), f"{l.flops:,}", f"{l.params:,}", str(list(l.output_shape)))
            for l in self.layers
        ]
        rows.append(("total", "", f"{self.flops:,}", f"{self.params:,}", ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        return "\n".join(line.rstrip() for line in [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])

    def __str__(self) -> str:
        return self.table()


def _own_params(module: nn.Module) -> int:
    n = sum(p.numel() for p in module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        n += sum(plist.original.numel() for plist in module.parametrizations.values())  # type: ignore[union-attr,operator]
    return n


def _per_sample(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() > 0 and t.shape[0] else t.numel()


def _flops(module: nn.Module, x: torch.Tensor | None, y: torch.Tensor) -> int:
    out = _per_sample(y)
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        assert x is not None
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return _per_sample(x) * per_input + (out if has_bias else 0)
    if isinstance(module, nn.modules.conv._ConvNd):
        return out * (module.in_channels // module.groups * math.prod(module.kernel_size)) + (out if has_bias else 0)
    if isinstance(module, nn.Linear):
        return out * module.in_features + (out if has_bias else 0)
    if isinstance(module, _NORMS):
        return 2 * out
    if isinstance(module, _POOLS):
        k = module.kernel_size
        return out * (math.prod(k) if isinstance(k, tuple) else k ** (y.dim() - 2))
    if isinstance(module, _ADAPTIVE_POOLS):
        return _per_sample(x) if x is not None else out
    if isinstance(module, _ACTIVATIONS):
        return out
    return 0


def _attention_flops(spec: Any, x: torch.Tensor | None, y: torch.Tensor) -> int:
    """Projections plus the q-k and attention-v products of one attention module, counted as a unit:
    inside, torchvision calls its projections functionally (``F.linear(x, self.qkv.weight)``,
    ``F.multi_head_attention_forward``), which leaf hooks cannot see."""
    if x is None:
        return 0
    qkv = getattr(spec.qkv, spec.weight_attr)
    inner = qkv.shape[0] // 3  # heads x head_dim
    if spec.kind == "mha":
        seq = x.shape[0] if (x.dim() == 3 and not getattr(spec.module, "batch_first", False)) else x.shape[-2]
        tokens, keys = seq, seq
    elif spec.kind == "swin":
        tokens, keys = math.prod(x.shape[1:-1]), math.prod(spec.module.window_size)
    else:  # maxvit: [B, G, P, D], attention within each of the G partitions
        tokens, keys = math.prod(x.shape[1:-1]), x.shape[-2]
    bias = getattr(spec.qkv, spec.bias_attr, None)
    flops = tokens * (qkv.numel() + spec.out.weight.numel() + 2 * keys * inner)
    return flops + tokens * ((qkv.shape[0] if bias is not None else 0) + (spec.out.out_features if spec.out.bias is not None else 0))


def _is_leaf(module: nn.Module) -> bool:
    return all(name == "parametrizations" for name, _ in module.named_children())


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


@torch.no_grad()
def count_flops_params(model: nn.Module, inputs: Any) -> FlopsParams:
    """Run ``model(*inputs)`` once (eval mode, no grad) and count FLOPs and parameters per leaf module.

    ``inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    """
    from .graph.attention import attention_spec

    layers: dict[str, LayerCount] = {}
    handles = []

    def hook_for(name: str, spec: Any = None):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            y = _first_tensor(output)
            if y is None:
                return
            x = _first_tensor(args)
            flops = _flops(module, x, y) if spec is None else _attention_flops(spec, x, y)
            if name in layers:
                layers[name].flops += flops
                layers[name].calls += 1
            else:
                params = _own_params(module) if spec is None else sum(_own_params(m) for m in module.modules())
                layers[name] = LayerCount(name, type(module).__name__, flops, params, tuple(y.shape))

        return hook

    units: list[str] = []  # attention modules: counted whole, their children not again
    for name, module in model.named_modules():
        if any(name.startswith(u + ".") for u in units) or ".parametrizations" in name or not name:
            continue
        spec = attention_spec(name, module)
        if spec is not None:
            units.append(name)
            handles.append(module.register_forward_hook(hook_for(name, spec)))
        elif _is_leaf(module):
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        if isinstance(inputs, dict):
            model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            model(*inputs)
        else:
            model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    table = sorted(layers.values(), key=lambda l: order[l.name])
    return FlopsParams(
        flops=sum(l.flops for l in table),
        params=sum(p.numel() for p in model.parameters()),
        layers=table,
    )

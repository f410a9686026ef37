"""Fold BatchNorm into the preceding convolution, keeping every module name."""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold each ``BatchNorm`` whose only input is a convolution used nowhere else, in place.

    The convolution takes the BatchNorm's running statistics and affine into its weight and bias
    (a bias is added if it had none) and the BatchNorm becomes ``nn.Identity``, so module names, and
    with them config_lists and calibrations, stay valid. Returns the ``(conv, bn)`` pairs folded.
    Needs a model ``torch.fx`` can trace.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # tracing errors come in many types
        raise ValueError(f"fold_batchnorm needs a model torch.fx can trace: {exc}") from exc
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if not isinstance(conv, _CONVS) or not bn.track_running_stats or bn.running_mean is None:
            continue
        pairs.append((str(src.target), str(node.target)))
    used = [c for c, _ in pairs]
    pairs = [p for p in pairs if used.count(p[0]) == 1]
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            conv.weight = weight
            conv.bias = bias
            parent, _, attr = bn_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    log.info("folded %d BatchNorm layer(s): %s", len(pairs), pairs)
    return pairs

"""Which ONNX nodes and tensors each PyTorch module became, checked rather than read from names.

The exporter writes each module's scope into node names; that gives a candidate. A candidate is
accepted only when the module's weight equals the node's weight initializer (exactly, or scaled per
output channel when a BatchNorm was folded in, and then the BatchNorm is identified by its own
factor), the node's op type fits the module type, and the tensor shapes recorded by forward hooks
match the shapes ONNX shape inference gives (batch dimension aside).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import InputError
from .graph_utils import WEIGHTED_OPS, through_identity, weight_axis

__all__ = ["ModuleMapping", "NameMap", "NameMapError", "build_name_map", "WEIGHTED_OPS"]

log = logging.getLogger(__name__)


_EXPECTED_OPS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvTransposeNd, ("ConvTranspose",)),
    (nn.modules.conv._ConvNd, ("Conv",)),
    (nn.Linear, ("Gemm", "MatMul")),
    (nn.modules.batchnorm._BatchNorm, ("BatchNormalization",)),
)


class NameMapError(InputError, LookupError):
    """A module could not be matched to the graph, or a match failed verification; names the module."""


@dataclass
class ModuleMapping:
    """One module in the graph. ``inputs``/``outputs`` hold one tensor per call of the module."""

    name: str
    module_type: str
    op_types: tuple[str, ...]
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    weight: str | None = None  # initializer name of the weight in the graph
    weight_node: str | None = None  # the Conv/Gemm/MatMul node consuming it
    weight_axis: int | None = None  # output-channel axis of that initializer
    weight_fold: np.ndarray | None = None  # graph weight / module weight per output channel (BatchNorm folded)
    folded_into: str | None = None  # for a BatchNorm: the weighted module it was folded into
    folded: list[str] = field(default_factory=list)  # for a weighted module: BatchNorms folded into it
    weight_nodes: list[str] = field(default_factory=list)  # every call's weighted node (shared weights)
    weight_inits: list[str] = field(default_factory=list)  # and the initializer each reads
    weight_folds: list = field(default_factory=list)  # and its fold factor (None: nothing folded)

    def to_dict(self) -> dict:
        return {
            "module_type": self.module_type,
            "op_types": list(self.op_types),
            "nodes": list(self.nodes),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "weight": self.weight,
            "weight_node": self.weight_node,
            "weight_nodes": list(self.weight_nodes),
            "weight_axis": self.weight_axis,
            "folded_into": self.folded_into,
            "folded": list(self.folded),
        }


class NameMap(Mapping[str, ModuleMapping]):
    """module name -> :class:`ModuleMapping`; :meth:`require` fails with the module named."""

    def __init__(self, mappings: Mapping[str, ModuleMapping], unmapped: Mapping[str, str] | None = None) -> None:
        self._m = dict(mappings)
        self.unmapped = dict(unmapped or {})  # module name -> why it has no nodes

    def __getitem__(self, key: str) -> ModuleMapping:
        return self._m[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def require(self, module: str) -> ModuleMapping:
        if module in self._m:
            return self._m[module]
        why = self.unmapped.get(module)
        if why:
            raise NameMapError(f"module {module!r} has no nodes in the exported graph: {why}")
        raise NameMapError(f"module {module!r} is not in the exported graph's name map (mapped modules: {sorted(self._m)[:20]})")

    def to_dict(self) -> dict:
        return {"modules": {k: v.to_dict() for k, v in self._m.items()}, "unmapped": dict(self.unmapped)}


# --------------------------------------------------------------------------------------------
class _Graph:
    """Lookups over one ONNX graph: producers, constants (through Identity), shapes."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.nodes = list(g.node)
        self.init = {i.name: i for i in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers[i].append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.shapes: dict[str, tuple] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)

    def constant_source(self, name: str) -> str | None:
        """The initializer behind ``name`` (following Identity nodes), or None for an activation."""
        src = through_identity(name, self._producer_of)
        return src if src in self.init else None

    def _producer_of(self, name: str):
        node = self.producer.get(name)
        return (node.op_type, node.input[0]) if node is not None and node.input else None

    def is_constant(self, name: str) -> bool:
        if not name or self.constant_source(name) is not None:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.init[name])


def _module_path(scope: list[str], modules: Mapping[str, nn.Module]) -> str | None:
    """Resolve the scope components of a node name to a qualified module name.

    A component is a child's name relative to its parent (``conv1``), or to an ancestor
    (``layer1.0``, ``downsample.0``), with ``_N`` appended for the N-th reuse of a module.
    """
    prefix = ""
    for comp in scope:
        found = None
        bases = [prefix]
        while bases[-1]:
            bases.append(bases[-1].rpartition(".")[0])
        for cand in dict.fromkeys((comp, re.sub(r"_\d+$", "", comp))):
            for base in bases:
                full = f"{base}.{cand}" if base else cand
                if full in modules and (not prefix or full.startswith(prefix + ".")):
                    found = full
                    break
            if found:
                break
        if found is None:
            return prefix or None
        prefix = found
    return prefix or None


def record_calls(model: nn.Module, args: tuple) -> tuple[dict[str, list[tuple[tuple, tuple]]], object]:
    """Per module, in call order: (input shapes, output shape) of each call; and the model's output."""
    calls: dict[str, list[tuple[tuple, tuple]]] = defaultdict(list)
    handles = []

    def hook(name):
        def fn(mod, inp, out):
            ins = tuple(tuple(t.shape) for t in inp if isinstance(t, torch.Tensor))
            o = out[0] if isinstance(out, (tuple, list)) and out else out
            calls[name].append((ins, tuple(o.shape) if isinstance(o, torch.Tensor) else ()))

        return fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            output = model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls, output


def _shapes_agree(torch_shape: tuple, onnx_shape: tuple | None) -> bool:
    if onnx_shape is None or len(torch_shape) != len(onnx_shape):
        return onnx_shape is None
    return all(o is None or o == 0 or t == o for t, o in zip(torch_shape[1:], onnx_shape[1:]))


def _weight_axis(node: onnx.NodeProto) -> int:
    return weight_axis(node.op_type, next((a.i for a in node.attribute if a.name == "transB"), 0))


def _fold_factor(graph_w: np.ndarray, module_w: np.ndarray, axis: int) -> np.ndarray | None:
    """Per-channel factor r with graph_w == module_w * r (r == 1 when nothing was folded)."""
    g = np.moveaxis(graph_w.astype(np.float64), axis, 0).reshape(graph_w.shape[axis], -1)
    m = np.moveaxis(module_w.astype(np.float64), axis, 0).reshape(module_w.shape[axis], -1)
    denom = (m * m).sum(1)
    r = np.where(denom > 0, (g * m).sum(1) / np.where(denom > 0, denom, 1.0), 1.0)
    if not np.allclose(g, m * r[:, None], rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(g).max(initial=0)))):
        return None
    return np.where(denom > 0, r, np.nan)  # a zeroed channel (pruned) fits any factor: NaN, "undetermined"


def _verify_weight(name: str, module: nn.Module, graph: _Graph, node: onnx.NodeProto) -> tuple[str, int, np.ndarray | None]:
    if len(node.input) < 2:
        raise NameMapError(f"module {name!r}: node {node.name} ({node.op_type}) has no weight input")
    src = graph.constant_source(node.input[1])
    if src is None:
        raise NameMapError(f"module {name!r}: weight of node {node.name} is not a constant initializer")
    gw = graph.array(src)
    mw = module.weight.detach().cpu().numpy()
    axis = _weight_axis(node)
    if node.op_type in ("MatMul",) or (node.op_type == "Gemm" and axis == 1):
        mw = mw.T  # Linear stores (out, in); these graph layouts hold (in, out)
    if gw.shape != mw.shape:
        raise NameMapError(
            f"module {name!r}: weight shape {tuple(mw.shape)} differs from initializer {src!r} {gw.shape} of node {node.name}"
        )
    fold = _fold_factor(gw, mw, axis)
    if fold is None:
        raise NameMapError(
            f"module {name!r}: initializer {src!r} of node {node.name} is neither the module's weight nor a per-channel rescaling of it"
        )
    known = ~np.isnan(fold)
    exact = np.allclose(fold[known], 1.0, rtol=0, atol=1e-7)
    return src, axis, None if exact else fold.astype(np.float32)


def _owns_weight(module: nn.Module) -> bool:
    return isinstance(module._parameters.get("weight"), torch.Tensor)


def build_name_map(model: nn.Module, args: tuple, proto: onnx.ModelProto, calls: Mapping | None = None) -> NameMap:
    """``calls`` (from :func:`record_calls`) saves a forward pass when the caller already ran one."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    graph = _Graph(proto)
    if calls is None:
        calls = record_calls(model, args)[0]

    order = {id(n): i for i, n in enumerate(graph.nodes)}
    by_scope: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    owner: dict[str, str] = {}
    for node in graph.nodes:
        if not node.name.startswith("/") or node.op_type == "Constant":
            continue
        scope_parts = node.name.split("/")[1:-1]
        module = _module_path(scope_parts, modules)
        if module is None:
            continue
        scope = "/".join(scope_parts)
        by_scope[scope].append(node)
        owner[scope] = module

    per_module: dict[str, list[list[onnx.NodeProto]]] = defaultdict(list)
    for scope, nodes in by_scope.items():
        module = modules.get(owner[scope])
        if module is None:
            continue
        if not any(True for _ in module.children()):
            per_module[owner[scope]].append(nodes)
        elif _owns_weight(module):
            # a weighted layer built from submodules (EfficientNet's Conv2dStaticSamePadding: a pad module,
            # then the conv): one call is its own nodes and its submodules' (the Pad and the Conv)
            inner = [n for s, ns in by_scope.items() if s.startswith(scope + "/") for n in ns]
            per_module[owner[scope]].append(sorted(inner + nodes, key=lambda n: order[id(n)]))

    mappings: dict[str, ModuleMapping] = {}
    for name, call_nodes in per_module.items():
        module = modules[name]
        op_types = tuple(dict.fromkeys(n.op_type for nodes in call_nodes for n in nodes))
        expected = next((ops for cls, ops in _EXPECTED_OPS if isinstance(module, cls)), None)
        if expected is not None and not set(expected) & set(op_types):
            raise NameMapError(f"module {name!r} ({type(module).__name__}) became {list(op_types)}, expected one of {list(expected)}")
        inputs, outputs = [], []
        for nodes in call_nodes:
            produced = {o for n in nodes for o in n.output}
            own = {id(n) for n in nodes}  # identity, not protobuf equality (a deep compare)
            ins = [i for n in nodes for i in n.input if i not in produced and not graph.is_constant(i)]
            outs = [o for n in nodes for o in n.output if o in graph.graph_outputs or any(id(c) not in own for c in graph.consumers[o])]
            inputs.append(ins[0] if ins else "")
            outputs.append(outs[-1] if outs else "")
        mapping = ModuleMapping(
            name=name,
            module_type=type(module).__name__,
            op_types=op_types,
            nodes=[n.name for nodes in call_nodes for n in nodes],
            inputs=inputs,
            outputs=outputs,
        )
        weighted = [[n for n in nodes if n.op_type in WEIGHTED_OPS] for nodes in call_nodes]
        if isinstance(getattr(module, "weight", None), torch.Tensor) and any(weighted):
            bad = [[n.name for n in w] for w in weighted if len(w) > 1]
            if bad:
                raise NameMapError(f"module {name!r}: expected one weighted node per call, found {bad[0]}")
            for (node,) in (w for w in weighted if w):  # a module called several times: one node per call
                src, axis, fold = _verify_weight(name, module, graph, node)
                mapping.weight_nodes.append(node.name)
                mapping.weight_inits.append(src)
                mapping.weight_folds.append(fold)
                mapping.weight_axis = axis
            mapping.weight, mapping.weight_node, mapping.weight_fold = mapping.weight_inits[0], mapping.weight_nodes[0], mapping.weight_folds[0]
        # shapes: the module's output per call, as PyTorch saw it at the example inputs
        recorded = calls.get(name, [])
        for out, (_, tshape) in zip(mapping.outputs, recorded):
            if out and tshape and not _shapes_agree(tshape, graph.shapes.get(out)):
                raise NameMapError(
                    f"module {name!r}: PyTorch output shape {tshape} differs from ONNX tensor {out!r} {graph.shapes.get(out)}"
                )
        mappings[name] = mapping

    unmapped: dict[str, str] = {}
    _map_folded_batchnorms(modules, mappings, unmapped, calls, graph)
    for name, mod in modules.items():
        if name not in mappings and name not in unmapped and not any(True for _ in mod.children()):
            unmapped[name] = "no node carries its scope (an identity in eval mode, or never called)" if name not in calls else (
                "it produced no ONNX nodes (constant-folded or an identity in eval mode)"
            )
    return NameMap(mappings, unmapped)


def _fold_matches(fold: np.ndarray, factor: np.ndarray) -> bool:
    """The per-channel factor of a folded weight equals a BatchNorm's gamma / sqrt(var + eps) on every
    channel where it is determined (channels whose weights are all zero fit any factor)."""
    if fold.shape != factor.shape:
        return False
    known = ~np.isnan(fold)
    return bool(known.any()) and np.allclose(fold[known], factor[known], rtol=1e-3, atol=1e-6)


def _map_folded_batchnorms(modules, mappings, unmapped, calls, graph: _Graph) -> None:
    """A BatchNorm folded into a Conv maps to that Conv's output, identified by its per-channel factor."""
    folded = [m for m in mappings.values() if m.weight_fold is not None]
    for name, bn in modules.items():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or name in mappings or bn.running_var is None:
            continue
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
        factor = (gamma / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
        match = [m for m in folded if not m.folded and _fold_matches(m.weight_fold, factor)]
        if len(match) > 1:  # identical factors (e.g. freshly initialised BNs): the one called right before
            order = list(calls)
            before = [m for m in match if m.name in order and name in order and order.index(m.name) < order.index(name)]
            match = before[-1:] if before else match[:1]
        if not match:
            continue
        conv = match[0]
        conv.folded.append(name)
        known = ~np.isnan(conv.weight_fold)
        conv.weight_fold = np.where(known, conv.weight_fold, factor).astype(np.float32)  # zeroed channels: the BN's own factor
        if conv.weight_folds:
            conv.weight_folds[0] = conv.weight_fold
        tshape = calls.get(name, [((), ())])[0][1]
        for out in conv.outputs:
            if tshape and not _shapes_agree(tshape, graph.shapes.get(out)):
                raise NameMapError(f"BatchNorm {name!r} folded into {conv.name!r}: output shapes differ ({tshape} vs {graph.shapes.get(out)})")
        mappings[name] = ModuleMapping(
            name=name,
            module_type=type(bn).__name__,
            op_types=(),
            nodes=list(conv.nodes),
            inputs=[],
            outputs=list(conv.outputs),
            folded_into=conv.name,
        )
        conv.outputs = []  # the pre-BatchNorm output no longer exists in the graph

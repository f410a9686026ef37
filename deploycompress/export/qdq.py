"""QuantizeLinear/DequantizeLinear surgery: the calibration written into the graph.

Where Q/DQ go and in which flavour is described once per target in :mod:`.targets`
(:class:`~.targets.QDQTarget`), the same description :func:`~.lint.lint_qdq` checks against:

* weights: per-channel on the output-channel axis (:func:`.graph_utils.weight_axis`), symmetric int8,
  zero point 0, stored as int8 initializers behind a DequantizeLinear; a BatchNorm folded into the
  weight rescales each channel's scale by the same factor, so the integer weights equal the simulated ones;
* activations per tensor, on the calibrated tensors, then moved by the target's rules: outputs of
  weighted ops kept float (TensorRT, except a residual Add's branch), dropped before an activation the
  target folds into the Q (onnxruntime: Relu/Clip), moved past value-copying ops (Pad in any mode, the
  Slice+Concat of circular padding, reshapes) to the weighted op's own input, one shared scale across
  a Concat and both sides of MaxPool/Reshape/Flatten/Transpose; graph outputs stay float for TensorRT
  and keep a calibrated Q/DQ for onnxruntime (the simulation quantized them too);
* the flavour follows the target from the one calibration (observed min/max): ``tensorrt`` gets
  S8 symmetric activations, ``onnxruntime`` U8 asymmetric activations and int32 biases, which its
  x86 kernels (QLinearConv, MatMulInteger on VNNI) run fastest.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from calibrators import QuantParams, params_from_range, qrange

from ..errors import InputError
from ..quantization.calib_config import CalibConfig
from .graph_utils import WEIGHTED_OPS, gs_constant, is_gemv, pad_constant
from .name_map import NameMap, NameMapError
from .onnx_export import MIN_OPSET, onnx_opset
from .targets import QDQ_TARGETS, QDQTarget, get_target

__all__ = ["BiasRangeWarning", "CalibrationSkippedWarning", "QDQError", "TARGETS", "insert_qdq", "needs_reduced_range", "skipped_calibration", "symbolic_shapes"]

log = logging.getLogger(__name__)

#: names of the registered targets (see :mod:`.targets`)
TARGETS = tuple(QDQ_TARGETS)


SKIPPED_KEY = "deploycompress.qdq.skipped"


class BiasRangeWarning(UserWarning):
    """A Conv/Gemm's int32 bias did not fit ``x_scale * w_scale``: the named channels' weight scales were widened."""


class CalibrationSkippedWarning(UserWarning):
    """A calibration entry names a module of the model that has no tensor in the exported graph."""


def skipped_calibration(qdq_model: onnx.ModelProto) -> list[dict[str, str]]:
    """The calibration entries :func:`insert_qdq` skipped (module, kind, reason), from the graph's metadata."""
    for p in qdq_model.metadata_props:
        if p.key == SKIPPED_KEY:
            return list(json.loads(p.value))
    return []


class QDQError(InputError, ValueError):
    """The calibration cannot be written into this graph; the message names modules and tensors."""


@dataclass
class _Act:
    params: QuantParams
    sources: list[str]  # "module.kind" entries that gave this range
    #: nodes that read the dequantized value; None: every consumer. A module's *input* calibration
    #: quantizes what that module reads, as the simulation does (its wrapper quantizes its own input):
    #: other readers of the tensor (a residual skip) keep the float value when the target says so
    readers: frozenset[str] | None = None
    #: the range was observed on this tensor alone; False: a module called several times (one ReLU
    #: module applied twice in a residual block) observed it, so the range is the union over its calls
    exact: bool = True


def _readers(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return None if a is None or b is None else a | b


def _union(a: QuantParams, b: QuantParams) -> QuantParams:
    return params_from_range(
        np.minimum(a.min, b.min), np.maximum(a.max, b.max), bits=a.bits, signed=a.signed, symmetric=a.symmetric, axis=None
    )


def _collect(calib: CalibConfig, name_map: NameMap, graph_tensors: set[str]):
    """Calibration entries -> weight and activation tensors; all naming errors raised together."""
    missing: list[str] = []
    skipped: list[dict[str, str]] = []
    weights: dict[str, tuple[str, QuantParams]] = {}
    acts: dict[str, _Act] = {}
    for module, kind, params in calib.items():
        if module in name_map.unmapped:  # in the model, but not in the graph: dead code, folded, an identity
            skipped.append({"module": module, "kind": kind, "reason": name_map.unmapped[module]})
            continue
        try:
            m = name_map.require(module)
        except NameMapError as exc:
            missing.append(str(exc))
            continue
        if kind == "weight":
            if m.weight is None:
                missing.append(f"module {module!r} has a weight calibration but no weight initializer in the graph")
                continue
            weights[module] = (m.weight, params)
            continue
        if params.axis is not None and params.scale.size > 1:
            raise QDQError(f"calibration of {module}.{kind}: activations must be per-tensor, got axis {params.axis}")
        tensors = m.inputs if kind == "input" else m.outputs
        if not any(tensors):
            why = f"BatchNorm {m.folded[0]!r} was folded into it" if m.folded else "it has no such tensor in the graph"
            skipped.append({"module": module, "kind": kind, "reason": why})
            continue
        for t in tensors:
            if not t:
                continue
            if t not in graph_tensors:
                missing.append(f"tensor {t!r} ({module}.{kind}) is not in the graph")
                continue
            readers = frozenset(m.nodes) if kind == "input" else None
            exact = len(tensors) == 1
            if t in acts:
                old = acts[t]
                if old.exact != exact:
                    # a shared module's range spans all its calls: the range observed on this tensor alone
                    # (the reading module's input) is the tensor's own; the union would widen its scale
                    merged = old.params if old.exact else params
                else:
                    merged = _union(old.params, params)
                acts[t] = _Act(merged, old.sources + [f"{module}.{kind}"], _readers(old.readers, readers), old.exact or exact)
            else:
                acts[t] = _Act(params, [f"{module}.{kind}"], readers, exact)
    if missing:
        raise QDQError("the calibration names modules or tensors the model lacks:\n  " + "\n  ".join(missing))
    for item in skipped:
        warnings.warn(f"calibration of {item['module']}.{item['kind']} is not used: {item['reason']}", CalibrationSkippedWarning, stacklevel=3)
    return weights, acts, skipped


def _copy_source(tensor: gs.Tensor, ops: tuple[str, ...]) -> gs.Tensor:
    """The tensor whose values ``tensor`` copies through value-copying ``ops`` (itself when none):
    Pad/Slice/Reshape... follow their data input; a Concat follows when all its data inputs copy
    one tensor (circular padding: ``Concat(Slice(x), x, Slice(x))``)."""
    for _ in range(32):
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or node.op not in ops:
            return tensor
        if node.op == "Concat":
            data = [i for i in node.inputs if gs_constant(i) is None]
            sources = {id(s): s for s in (_copy_source(i, ops) for i in data)}
            return next(iter(sources.values())) if len(sources) == 1 else tensor
        if not node.inputs or gs_constant(node.inputs[0]) is not None:
            return tensor
        tensor = node.inputs[0]
    return tensor


def _pad_values(tensor: gs.Tensor, source: gs.Tensor) -> list[float]:
    """Constant values a constant-mode Pad writes between ``source`` and ``tensor`` (its range must hold them)."""
    values = []
    while tensor is not source and tensor.inputs:
        node = tensor.inputs[0]
        c = pad_constant(node)
        if c is not None:
            values.append(c)
        tensor = node.inputs[0] if node.op != "Concat" else next(i for i in node.inputs if gs_constant(i) is None)
    return values


def _constant_pads_only(tensor: gs.Tensor, source: gs.Tensor) -> bool:
    """True when only constant-mode Pads lie between ``source`` and ``tensor``."""
    while tensor is not source:
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or pad_constant(node) is None:
            return False
        tensor = node.inputs[0]
    return True


def _pads_after_quantize(graph: gs.Graph, dq_source: dict[str, str]) -> None:
    """Move each per-tensor DequantizeLinear that feeds a non-zero constant-mode Pad to after the Pad.

    ``Q -> DQ -> Pad(c) -> Conv`` becomes ``Q -> Pad(q(c)) -> DQ -> Conv``: the Pad copies integers (its
    constant quantized with the same scale and zero point: ONNX Pad, opset >= 11, takes it as input 2)
    and onnxruntime fuses DQ -> Conv -> Q into QLinearConv. A zero Pad keeps ``DQ -> Pad(0) -> Conv``:
    onnxruntime's PadFusion folds it into the Conv's ``pads`` first, leaving DQ -> Conv -> Q. The Pad's output keeps its name (on the new
    DQ), so its readers are unchanged; ``dq_source`` learns the new dequantized tensor.
    """
    for node in list(graph.nodes):
        c = pad_constant(node)
        if not c or not node.inputs[0].inputs:  # a zero Pad stays after the DQ: onnxruntime folds it into the Conv
            continue
        dq = node.inputs[0].inputs[0]
        if dq.op != "DequantizeLinear" or dq.outputs[0].name not in dq_source or "axis" in dq.attrs:
            continue
        q, scale, zp = dq.inputs[0], gs_constant(dq.inputs[1]), gs_constant(dq.inputs[2])
        lo, hi = np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max
        qc = np.asarray(np.clip(np.round(c / float(scale)) + int(zp), lo, hi), dtype=zp.dtype)
        out = node.outputs[0]
        qout = gs.Variable(f"{out.name}_quantized", dtype=zp.dtype, shape=out.shape)
        inputs = [q, node.inputs[1], gs.Constant(f"{node.name}_quantized_value", qc)] + list(node.inputs[3:])
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.outputs[0] = qout
        graph.nodes.append(gs.Node("DequantizeLinear", f"{out.name}_DequantizeLinear", inputs=[qout, dq.inputs[1], dq.inputs[2]], outputs=[out]))
        dq_source[out.name] = dq_source[dq.outputs[0].name]


def _depth_to_branch_point(node: gs.Node, limit: int = 256) -> dict[str, int]:
    """Input tensor name -> number of nodes between it and the nearest node both inputs descend from
    (the residual block's fork); inputs without a common ancestor are left out."""
    def ancestors(t: gs.Tensor) -> dict[int, tuple[int, gs.Node]]:
        seen: dict[int, tuple[int, gs.Node]] = {}
        frontier = [(0, t.inputs[0])] if t.inputs else []
        while frontier and len(seen) < limit:
            d, n = frontier.pop(0)
            if id(n) in seen:
                continue
            seen[id(n)] = (d, n)
            frontier.extend((d + 1, i.inputs[0]) for i in n.inputs if i.inputs)
        return seen

    data = [i for i in node.inputs if gs_constant(i) is None]
    if len(data) != 2:
        return {}
    a, b = ancestors(data[0]), ancestors(data[1])
    common = set(a) & set(b)
    if not common:
        return {}
    fork = min(common, key=lambda k: a[k][0] + b[k][0])
    return {data[0].name: a[fork][0], data[1].name: b[fork][0]}


def _place(graph: gs.Graph, acts: dict[str, _Act], target: QDQTarget) -> dict[str, _Act]:
    """Apply ``target``'s placement rules to the calibrated tensors; returns tensor name -> range."""
    producers = {o.name: n for n in graph.nodes for o in n.outputs}
    graph_outputs = {t.name for t in graph.outputs}
    weighted_out = {name for name, n in producers.items() if n.op in WEIGHTED_OPS}
    if not target.graph_outputs_float:
        graph_outputs = set()
    # a graph output that a weighted op also reads is quantized for that reader only (the output
    # itself stays the float tensor: _qdq_pair's output_float)
    read_by_weighted = {n.inputs[0].name for n in graph.nodes if n.op in WEIGHTED_OPS and n.inputs}
    chosen = {t: a for t, a in acts.items() if t not in graph_outputs or t in read_by_weighted}
    if target.weighted_outputs_float:
        feeds_weighted = {n.inputs[0].name for n in graph.nodes if n.op in WEIGHTED_OPS and n.inputs}
        keep = {t: a for t, a in chosen.items() if t not in weighted_out or t in feeds_weighted}
        if target.residual_add_branch:
            for node in graph.nodes:
                if node.op != "Add" or any(i.name in keep for i in node.inputs):
                    continue
                if not any(i.inputs and i.inputs[0].op in target.residual_fusing_ops for i in node.inputs):
                    continue  # no conv to fuse the Add into (a transformer's residual stream): it stays float
                # the shortcut: not a weighted op's output, else the input nearer the branch point (a
                # downsample conv); the longer main branch's last conv then fuses the Add (TensorRT's
                # residual fusion; ModelOpt's non-residual input is the one farther from the common ancestor)
                depth = _depth_to_branch_point(node)
                branch = sorted((i.name for i in node.inputs if i.name in chosen), key=lambda t: (t in weighted_out, depth.get(t, 0)))
                if branch:
                    keep[branch[0]] = chosen[branch[0]]
        chosen = keep
    # an activation folded into the Q after it (its range already clamps): a Q/DQ pair before it
    # would block the producer's fusion (onnxruntime: Conv+Relu+Q -> QLinearConv)
    for node in graph.nodes:
        if node.op in target.folds_into_quantize and node.outputs[0].name in chosen:
            src = node.inputs[0]
            if src.name in chosen and all(c is node for c in src.outputs):
                del chosen[src.name]
    # value-copying ops (padding, slices, reshapes) between a quantized tensor and a weighted op:
    # the weighted op's own input gets the Q/DQ, so its kernel sees a DequantizeLinear
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or not node.inputs or node.inputs[0].name in chosen:
            continue
        x = node.inputs[0]
        src = _copy_source(x, target.moves_past)
        if src is x or src.name not in chosen:
            continue
        act = chosen[src.name]
        params = act.params
        pads = _pad_values(x, src)
        if pads:
            params = _union(params, params_from_range(min(pads), max(pads), bits=params.bits, signed=params.signed,
                                                      symmetric=params.symmetric))
        if target.quantized_pads and _constant_pads_only(x, src):
            # the Pads run on the quantized tensor (insert_qdq moves the DQ after them): the source's
            # range widens to hold the pad constant, and no second Q/DQ pair is needed
            chosen[src.name] = _Act(params, act.sources + [f"holds the pad constant before {node.name}"], act.readers)
            continue
        chosen[x.name] = _Act(params, act.sources + [f"moved past the value-copying ops before {node.name}"], frozenset([node.name]))
    for node in reversed(graph.nodes):  # outputs before inputs: a chain of such ops propagates back
        src = node.inputs[0] if node.inputs else None
        if (node.op in target.same_scale_ops and src is not None and src.name not in chosen and src.name not in graph_outputs
                and node.outputs[0].name in chosen and len(src.outputs) == 1 and not isinstance(src, gs.Constant)):
            # values pass unchanged, so the output's range holds for the input; quantizing before the op lets
            # the producer (a pooling op, e.g. a functional global average pool) run in int8 as well
            out = chosen[node.outputs[0].name]
            chosen[src.name] = _Act(out.params, out.sources + [f"propagated back through {node.name}"])
    for node in graph.nodes:  # a residual Add with every input and its output quantized: one integer kernel
        if node.op not in target.integer_binary_ops or node.outputs[0].name not in chosen:
            continue
        data = [i for i in node.inputs if gs_constant(i) is None]
        if len(data) > 1 and all(i.name in chosen for i in data):
            for i in data:
                act = chosen[i.name]
                if act.readers is not None:
                    chosen[i.name] = _Act(act.params, act.sources + [f"read quantized by {node.name}"], act.readers | {node.name})
    for _ in range(16):  # shared scales spread along chains (circular padding: Concat of Concats)
        if not _share_scales(graph, chosen, acts, target, graph_outputs):
            break
    if target.weighted_outputs_float:
        _drop_float_concat_inputs(graph, chosen, target)
    if target.float_gemv:
        _drop_float_gemv_inputs(graph, chosen, target)
    if target.weighted_outputs_float:
        _drop_copied_sources(graph, chosen, target)
    return chosen


#: ops that read a tensor's shape, not its values
_SHAPE_READERS = ("Shape", "Size")


def _drop_copied_sources(graph: gs.Graph, chosen: dict[str, _Act], target: QDQTarget) -> None:
    """A tensor whose every reader is a chain of value-copying ops ending at a quantized weighted-op input loses
    its own Q/DQ pair.

    The pair where the weighted op reads (moved past the copies, or that op's own input calibration) already
    quantizes those values; a second pair before the Pad/Reshape only makes the copy run in int8 between two
    conversions. On a target whose weighted ops need no quantized output that is all it does (TensorRT:
    ``Clip -> Q/DQ -> Pad -> Q/DQ -> Conv`` becomes ``Clip -> Pad -> Q/DQ -> Conv``, ModelOpt's placement); a
    target that fuses the producer into a quantized output (onnxruntime: Conv+Clip+Q) keeps it. A Concat is
    followed only when all its inputs copy the one tensor (circular padding): branches joined by a Concat keep
    their pairs (one shared scale, the Concat in int8).
    """
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    stops = {n.inputs[0].name for n in graph.nodes if n.op in WEIGHTED_OPS and n.inputs and n.inputs[0].name in chosen}

    def copies_into_stops(t: gs.Tensor, src: str, depth: int = 0) -> bool:
        if depth and t.name in stops:
            return True
        if t.name in outputs or not t.outputs or depth > 32:
            return False
        return all(n.op in _SHAPE_READERS or (
            n.op in target.moves_past and (n.op != "Concat" or _copy_source(n.outputs[0], target.moves_past).name == src)
            and all(copies_into_stops(o, src, depth + 1) for o in n.outputs)) for n in t.outputs)

    for name in [t for t in chosen if t not in stops]:
        if name in tensors and copies_into_stops(tensors[name], name):
            del chosen[name]


def _drop_float_concat_inputs(graph: gs.Graph, chosen: dict[str, _Act], target: QDQTarget) -> None:
    """Inputs read only by Concats that stay float lose their Q/DQ (targets whose weighted ops output float).

    A Concat's calibrated inputs take one shared scale, but when its output is not quantized (a ReLU reads it, as
    in a Fire block ``Conv -> Concat -> ReLU -> Conv``) the Concat runs in float and the Q/DQ pairs would only make
    the convs before it output int8, which the target's rule (``weighted_outputs_float``) refuses; NVIDIA
    ModelOpt leaves such a Concat's inputs float as well.
    """
    float_concats = {n.name for n in graph.nodes if n.op in target.shared_scale_ops and n.outputs[0].name not in chosen}
    if not float_concats:
        return
    tensors = graph.tensors()
    for name in list(chosen):
        t = tensors.get(name)
        if t is not None and t.outputs and all(r.name in float_concats for r in t.outputs):
            del chosen[name]


def _drop_float_gemv_inputs(graph: gs.Graph, chosen: dict[str, _Act], target: QDQTarget) -> None:
    """Tensors read only by float GEMVs (and the data-movement ops before them: Flatten, Reshape) lose their Q/DQ."""
    float_readers = {n.name for n in graph.nodes if is_gemv(n)}
    tensors = graph.tensors()
    changed = True
    while changed:
        changed = False
        for name in list(chosen):
            t = tensors[name]
            if t.outputs and all(r.name in float_readers for r in t.outputs):
                del chosen[name]
                changed = True
                p = t.inputs[0] if t.inputs else None
                if p is not None and (p.op in target.same_scale_ops or p.op in target.moves_past):
                    float_readers.add(p.name)


def _same(a: QuantParams, b: QuantParams) -> bool:
    return np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max)


def _share_scales(graph: gs.Graph, chosen: dict[str, _Act], acts: dict[str, _Act], target: QDQTarget,
                  graph_outputs: set[str]) -> bool:
    """One pass of the shared-scale rules; True when it changed a range."""
    changed = False

    def assign(t: str, act: _Act) -> None:
        nonlocal changed
        if t not in chosen or not _same(chosen[t].params, act.params):
            changed = True
            chosen[t] = act

    for node in graph.nodes:
        if node.op in target.same_scale_ops and node.inputs and node.inputs[0].name in chosen and node.outputs[0].name in chosen:
            # a data-movement op between two Q/DQ pairs runs in int8 only when both sides agree
            a, b = chosen[node.inputs[0].name], chosen[node.outputs[0].name]
            if not _same(a.params, b.params):
                shared = _Act(_union(a.params, b.params), a.sources + b.sources + [f"shared scale of {node.name}"])
                assign(node.inputs[0].name, shared)
                assign(node.outputs[0].name, shared)
        if node.op not in target.shared_scale_ops:
            continue
        members = [t.name for t in node.inputs if gs_constant(t) is None] + [node.outputs[0].name]
        known = [t for t in members if t in chosen or t in acts]
        if not known:
            continue
        out = node.outputs[0].name
        shared = None
        for t in known:
            p = (chosen.get(t) or acts[t]).params
            shared = p if shared is None else _union(shared, p)
        targets = members if out in known else known
        for t in targets:
            if t in graph_outputs:
                continue
            old = chosen.get(t) or acts.get(t)
            if old is None or t not in chosen or not _same(old.params, shared):
                assign(t, _Act(shared, (old.sources if old else []) + [f"shared scale of {node.name}"]))
    return changed


def _act_flavour(p: QuantParams, target: QDQTarget, where: str) -> QuantParams:
    if p.bits != 8:
        raise QDQError(f"{where}: {p.bits}-bit activations cannot be expressed as QDQ for {target.name} (8 bits only)")
    return target.activation_flavour(p)


def needs_reduced_range(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU without VNNI (uint8 x int8 products saturate there with 8-bit weights)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False  # unknown CPU: keep the weights exactly as calibrated
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def _weight_scales(module: str, p: QuantParams, channels: int, fold: np.ndarray | None, bits: int) -> np.ndarray:
    if p.bits != 8:
        raise QDQError(f"calibration of {module}.weight: {p.bits}-bit weights cannot be expressed as int8 QDQ")
    sym = p.with_flavour(symmetric=True, signed=True, bits=bits)
    scale = np.asarray(sym.scale, dtype=np.float64).reshape(-1)
    if scale.size not in (1, channels):
        raise QDQError(
            f"calibration of {module}.weight has {scale.size} scales but the graph weight has {channels} output channels "
            "(calibrate the model that is exported, e.g. after speedup)"
        )
    scale = np.broadcast_to(scale, (channels,)).copy()
    if fold is not None:
        scale = scale * np.abs(fold.astype(np.float64))
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)  # zeroed channels: any scale holds 0 exactly
    return scale.astype(np.float32)


def _fit_int32_bias(scale: np.ndarray, q: np.ndarray, axis: int, node: gs.Node, dq_source: dict, act_params: dict,
                    int32_bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weight scales that keep a Conv/Gemm's int32 bias (scale ``x_scale * w_scale``) within int32.

    Returns ``(scale, widened)``, ``widened`` marking the channels with weights whose scale had to grow.
    The smallest scale that holds a bias ``b`` is ``|b| / (x_scale * 2**30)`` (half of int32's range,
    a factor 2 of headroom). A channel whose int8 row is all zero (masked channels speedup kept) takes
    exactly that: it outputs its bias alone and any weight scale represents its zeros, while a
    placeholder scale of 1 would round the bias to whole activation steps. A channel with weights whose
    calibrated scale is smaller (a tiny input range, e.g. inputs in small units or a nearly dead
    activation, under a large bias) is widened to it: otherwise the bias would be clipped at
    ``2**31 * x_scale * w_scale``. onnxruntime's quantizer does the same
    (``QDQQuantizer._adjust_weight_scale_for_int32_bias``, after TFLite's ``quantization_utils``).
    """
    widened = np.zeros(scale.shape, bool)
    x_name = dq_source.get(node.inputs[0].name) if node.inputs else None
    if not int32_bias or len(node.inputs) < 3 or x_name not in act_params or axis != 0 or node.op not in ("Conv", "Gemm"):
        return scale, widened
    b = gs_constant(node.inputs[2])
    if b is None or b.ndim != 1 or b.size != scale.size:
        return scale, widened
    zero_rows = ~np.moveaxis(q != 0, axis, 0).reshape(q.shape[axis], -1).any(1)
    fit = np.abs(b.astype(np.float64)) / (np.float64(act_params[x_name].scale.reshape(())) * 2**30)
    widened = ~zero_rows & (fit > scale.astype(np.float64))
    out = np.where(zero_rows & (fit > 0), fit, scale.astype(np.float64))
    out = np.where(widened, fit, out).astype(scale.dtype)
    widened &= out > scale  # float32 rounding of fit may land on the old scale
    return out, widened


def _qdq_pair(graph: gs.Graph, tensor: gs.Variable, scale, zero_point, *, axis: int | None = None,
              readers: frozenset[str] | None = None, output_float: bool = False) -> gs.Variable:
    base = tensor.name
    s = gs.Constant(f"{base}_scale", np.asarray(scale, dtype=np.float32))
    z = gs.Constant(f"{base}_zero_point", np.asarray(zero_point))
    q = gs.Variable(f"{base}_quantized", dtype=z.values.dtype, shape=tensor.shape)
    dq = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    attrs = {} if axis is None else {"axis": axis}
    source, out = tensor, dq
    if readers is not None:  # only these nodes read the quantized value; the rest keep the float tensor
        consumers = [n for n in tensor.outputs if n.name in readers]
    elif any(t is tensor for t in graph.outputs) and tensor.inputs and not output_float:
        # a graph output keeps its name on the dequantized value; the producer writes a new float tensor
        producer = tensor.inputs[0]
        source = gs.Variable(f"{base}_float", dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[[i for i, o in enumerate(producer.outputs) if o is tensor][0]] = source
        consumers, out = [], tensor
    else:
        consumers = list(tensor.outputs)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_QuantizeLinear", attrs=dict(attrs), inputs=[source, s, z], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_DequantizeLinear", attrs=dict(attrs), inputs=[q, s, z], outputs=[out]))
    for node in consumers:
        for i, inp in enumerate(node.inputs):
            if inp is tensor:
                node.inputs[i] = dq
    return out


def _dq_constant(graph: gs.Graph, name: str, values: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> gs.Variable:
    q = gs.Constant(f"{name}_quantized", values)
    s = gs.Constant(f"{name}_scale", scale.astype(np.float32))
    z = gs.Constant(f"{name}_zero_point", zp)
    out = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_DequantizeLinear", attrs={"axis": axis}, inputs=[q, s, z], outputs=[out]))
    return out


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with onnxruntime's symbolic shape inference written into its value_info (the nodes unchanged).

    Dims keep the input's names (``batch``) through computed Pads, where ONNX shape inference makes up
    ``unk__N``; onnxruntime's graph optimizer needs the names to match to fold a ``Shape`` of the
    input into a constant ``Reshape`` (ReshapeFusion). A graph the inference cannot read is returned as
    it was, with a logged warning (it runs the same, only those ops stay).
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # noqa: BLE001 - the inference raises many types; the graph stays valid without it
        log.warning("symbolic shape inference failed (%s: %s): value_info left as ONNX inferred it", type(exc).__name__, exc)
        return model
    return inferred if inferred is not None else model


def insert_qdq(
    onnx_model: onnx.ModelProto,
    calib_config: CalibConfig,
    name_map: NameMap,
    *,
    target: str | QDQTarget = "onnxruntime",
    reduce_range: bool | None = None,
) -> onnx.ModelProto:
    """Return a copy of ``onnx_model`` with the calibration written in as Q/DQ nodes for ``target``.

    ``reduce_range`` (onnxruntime only) stores weights in 7 bits: x86 CPUs without VNNI multiply
    uint8 x int8 with ``vpmaddubsw``, whose int16 pair sums saturate with full-range weights (measured
    here: logits off by 2.2 on the digits CNN instead of 0.18). ``None`` decides from this host's CPU.
    """
    try:
        spec = get_target(target)
    except ValueError as exc:
        raise QDQError(str(exc)) from None
    if reduce_range is None:
        reduce_range = spec.reduce_range_allowed and needs_reduced_range()
    if reduce_range and not spec.reduce_range_allowed:
        raise QDQError(f"reduce_range is an onnxruntime (x86 without VNNI) work-around; {spec.name} takes full int8 weights")
    wbits = 7 if reduce_range else 8
    opset = onnx_opset(onnx_model)
    if opset < MIN_OPSET:
        raise QDQError(f"the graph's opset is {opset}; QDQ with per-channel weights needs opset >= {MIN_OPSET}")
    if not len(calib_config):
        raise QDQError("the calibration is empty: nothing to quantize")
    graph = gs.import_onnx(onnx_model)
    tensors = graph.tensors()
    weights, acts, skipped = _collect(calib_config, name_map, set(tensors))
    placed = _place(graph, acts, spec)

    act_params: dict[str, QuantParams] = {}
    dq_source: dict[str, str] = {}  # dequantized tensor -> the activation it stands for
    for tname, act in placed.items():
        p = _act_flavour(act.params, spec, f"calibration of {', '.join(act.sources)}")
        act_params[tname] = p
        zp = np.asarray(p.zero_point.reshape(()), dtype=np.int8 if p.signed else np.uint8)
        readers = act.readers if spec.skip_reads_float and act.readers is not None else None
        if readers is not None and all(c.name in readers for c in tensors[tname].outputs):
            readers = None
        dq = _qdq_pair(graph, tensors[tname], np.float32(p.scale.reshape(())), zp, readers=readers,
                       output_float=spec.graph_outputs_float)
        dq_source[dq.name] = tname
    if spec.quantized_pads:
        _pads_after_quantize(graph, dq_source)

    nodes_by_name = {n.name: n for n in graph.nodes}
    made: dict[str, tuple[gs.Variable, np.ndarray]] = {}  # initializer -> its DequantizeLinear output (shared weights)
    for module, (_, p) in weights.items():
        m = name_map[module]
        folds = [m.weight_fold] + list(m.weight_folds[1:])
        for k, (node_name, init_name) in enumerate(zip(m.weight_nodes or [m.weight_node], m.weight_inits or [m.weight])):
            node = nodes_by_name.get(node_name or "")
            if node is None:
                raise QDQError(f"module {module!r}: its node {node_name!r} is not in this graph")
            if spec.float_gemv and is_gemv(node):
                why = f"{node.op} {node.name} is a matrix-vector product at batch 1: {spec.name} keeps it float"
                skipped.append({"module": module, "kind": "weight", "reason": why})
                warnings.warn(f"calibration of {module}.weight is not used: {why}", CalibrationSkippedWarning, stacklevel=2)
                continue
            axis = int(m.weight_axis or 0)
            if init_name in made:
                node.inputs[1], scale = made[init_name]
            else:
                w = gs_constant(node.inputs[1])
                if w is None:
                    raise QDQError(f"module {module!r}: the weight of node {node.name} is not a constant")
                scale = _weight_scales(module, p, w.shape[axis], folds[k] if k < len(folds) else None, wbits)
                bshape = [1] * w.ndim
                bshape[axis] = -1
                zero = ~np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).any(1)
                if zero.any() and not zero.all():
                    # an all-zero (pruned) channel quantizes to 0 at any scale; a typical scale keeps its
                    # int32 bias (scale x_scale * w_scale) as fine as the other channels' (a zero range
                    # calibrates to scale 1, which would round a folded BatchNorm's bias to x_scale)
                    scale = np.where(zero, np.float32(np.median(scale[~zero])), scale).astype(np.float32)
                q = np.clip(np.round(w / scale.reshape(bshape)), *qrange(wbits, True)).astype(np.int8)
                scale, widened = _fit_int32_bias(scale, q, axis, node, dq_source, act_params, spec.int32_bias)
                if widened.any():
                    q = np.clip(np.round(w / scale.reshape(bshape)), *qrange(wbits, True)).astype(np.int8)
                    why = (f"{int(widened.sum())} of {widened.size} channel(s) of {node.op} {node.name}: its input's scale "
                           f"{float(act_params[dq_source[node.inputs[0].name]].scale.reshape(())):.3g} times their weight "
                           "scales cannot hold their bias in int32, so the weight scales were widened to fit the bias "
                           "(coarser int8 weights there; onnxruntime's quantizer does the same)")
                    log.info("%s: %s", module, why)
                    warnings.warn(f"calibration of {module}.weight: {why}", BiasRangeWarning, stacklevel=2)
                node.inputs[1] = _dq_constant(graph, init_name, q, scale, np.zeros(scale.shape, np.int8), axis)
                made[init_name] = (node.inputs[1], scale)
            # int32 bias for onnxruntime: with it the Conv/Gemm and its Q/DQ fuse into one integer kernel
            x_name = dq_source.get(node.inputs[0].name)
            if spec.int32_bias and len(node.inputs) > 2 and x_name in act_params and node.op in ("Conv", "Gemm") and axis == 0:
                b = gs_constant(node.inputs[2])
                if b is not None and b.ndim == 1 and b.size == scale.size:
                    bscale = (np.float64(act_params[x_name].scale.reshape(())) * scale.astype(np.float64)).astype(np.float32)
                    # float64: in float32 the upper bound rounds to 2**31, which wraps to -2**31 in the cast
                    qb = np.clip(np.round(b.astype(np.float64) / bscale), -(2**31), 2**31 - 1).astype(np.int32)
                    node.inputs[2] = _dq_constant(graph, f"{node.name}_bias", qb, bscale, np.zeros(bscale.shape, np.int32), 0)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    del out.opset_import[:]
    out.opset_import.extend(onnx_model.opset_import)
    out.ir_version = onnx_model.ir_version
    if skipped:  # what the graph does not carry, for the report (read back with skipped_calibration)
        onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, SKIPPED_KEY: json.dumps(skipped)})
    onnx.checker.check_model(out)
    if spec.symbolic_shapes:
        out = symbolic_shapes(out)
    log.info("inserted Q/DQ for %s: %d activation tensors, %d weights", spec.name, len(act_params), len(weights))
    return out

"""int8 Linears in an exported transformer graph, written by us: calibration, SmoothQuant, three flavours.

A Linear in the exported graph is a ``MatMul`` whose input B is a constant ``(in, out)`` matrix,
usually followed by an ``Add`` of a constant bias. The steps:

1. :func:`collect_stats` runs the fp32 graph on calibration feeds and keeps, for every Linear input
   tensor, the per-channel (last axis) minimum and maximum.
2. :func:`smooth` (optional) migrates activation outliers into the weights -- SmoothQuant (Xiao et al.,
   2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
   eq. 4): per input channel ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, ``X' = X / s``,
   ``W' = diag(s) W``. Linears sharing an input (query/key/value) share ``s``. Where ``X / s`` is made:

   - the attention context (the output projection's input, ``softmax(QK^T) V`` with its heads merged)
     is linear in the value projection's output channel by channel, so ``1 / s`` folds exactly into
     the value Linear's weight columns and bias (no node added; :func:`attention_context_source`);
   - any other input (a LayerNorm output, a GELU output) gets a ``Mul`` on the Linears' branch only: in
     BERT-style post-LN encoders the LayerNorm output also feeds the residual, which must keep ``X``
     (folding ``1 / s`` into gamma/beta would need the same ``Mul`` by ``s`` on the residual branch,
     no node saved), and GELU does not commute with a scale. ``only`` restricts smoothing to some
     groups (e.g. the foldable ones, for a graph without any ``Mul`` added).
3. :func:`quantize_linears` writes each chosen Linear in one of the :data:`FLAVOURS`:

   - ``"qdq"``: ``QuantizeLinear -> DequantizeLinear -> MatMul`` with a ``DequantizeLinear`` of int8
     weights (the portable ONNX form; onnxruntime fuses it to ``MatMulIntegerToFloat``);
   - ``"integer"``: ``QuantizeLinear -> MatMulIntegerToFloat`` (onnxruntime's ``com.microsoft`` op)
     with the bias folded in, static activation scale (fewer nodes than what onnxruntime makes of QDQ);
   - ``"dynamic"``: ``DynamicQuantizeLinear -> MatMulIntegerToFloat`` with the bias for an input read
     by several Linears (query/key/value), ``DynamicQuantizeMatMul`` (the same arithmetic in one node)
     for an input read by one: the activation range measured per call, as onnxruntime's
     ``quantize_dynamic`` does, with our per-channel weights.

4. :func:`quantize_attention_matmuls` (optional) writes the attention MatMuls, whose both inputs are
   activations -- the scores ``Q K^T`` and the context ``softmax(.) V`` -- as ``DynamicQuantizeLinear``
   on each input ``-> MatMulIntegerToFloat``: uint8 per tensor, the range measured per call.

Activations: uint8, asymmetric, per tensor (calibrated min/max widened to include 0); weights: int8,
symmetric, per output channel (7-bit on x86 without VNNI: ``reduce_range``). Only the Linears read
quantized tensors; everything else in the graph reads what it read before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLAVOURS = ("qdq", "integer", "dynamic")
MS_DOMAIN = "com.microsoft"

__all__ = ["FLAVOURS", "INPUT_KINDS", "InputStats", "attention_context_source", "ATTENTION_MATMULS", "attention_matmuls", "attention_probabilities", "input_kinds", "quantize_attention_matmuls", "collect_stats", "linear_inputs", "quantize_linears", "smooth"]


@dataclass
class InputStats:
    """Per-channel (last axis) minimum and maximum of one Linear input over the calibration feeds."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    def uint8(self) -> tuple[np.float32, np.uint8]:
        """Per-tensor uint8 scale and zero point (range widened to include 0, as onnxruntime's MinMax)."""
        lo, hi = min(float(self.lo.min()), 0.0), max(float(self.hi.max()), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        return np.float32(scale), np.uint8(np.clip(round(-lo / scale), 0, 255))


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def linear_inputs(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, list[str]]:
    """``{input tensor: [MatMul node names]}`` for the named MatMuls whose input B is an initializer
    (Linears sharing an input, like query/key/value, are grouped). Raises ``ValueError`` for a name
    that is not such a MatMul."""
    inits = _inits(model)
    by_name = {n.name: n for n in model.graph.node}
    groups: dict[str, list[str]] = {}
    for name in nodes:
        n = by_name.get(name)
        if n is None or n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            raise ValueError(f"{name!r} is not a MatMul with a constant 2-D weight (a Linear) in this graph")
        groups.setdefault(n.input[0], []).append(name)
    return groups


def collect_stats(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], tensors: Sequence[str], threads: int | None = None) -> dict[str, InputStats]:
    """Per-channel min/max of ``tensors`` (float, channels on the last axis) over ``feeds`` with onnxruntime."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    known = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in known:
            m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    stats: dict[str, InputStats] = {}
    for f in feeds:
        for t, v in zip(tensors, sess.run(list(tensors), dict(f))):
            v = v.reshape(-1, v.shape[-1])
            lo, hi = v.min(0), v.max(0)
            s = stats.get(t)
            stats[t] = InputStats(lo, hi) if s is None else InputStats(np.minimum(s.lo, lo), np.maximum(s.hi, hi))
    return stats


def _attr(node: onnx.NodeProto, name: str):  # noqa: ANN202
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer, or of an ``Identity`` of one (how the exporter shares equal constants)."""
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    n = next((n for n in model.graph.node if name in n.output), None)
    return _constant(model, n.input[0]) if n is not None and n.op_type == "Identity" else None


def attention_context_source(model: onnx.ModelProto, tensor: str) -> tuple[onnx.NodeProto, str, str | None] | None:
    """The value Linear whose output channels are ``tensor``'s channels one for one, when ``tensor``
    is an attention context: ``Reshape(Transpose_{0,2,1,3}(MatMul(P, Transpose_{0,2,1,3}(Reshape(V)))))``
    with ``V = X W (+ b)``, ``W`` a constant 2-D weight and ``b`` a constant bias of ``W``'s width,
    each intermediate tensor read only along this path. Returns ``(MatMul node, weight name, bias name
    or None)``, or ``None`` for anything else. The heads' split and merge are row-major reshapes of the
    last axis, so channel ``j`` of ``V`` becomes channel ``j`` of the context, scaled per channel by
    nothing but the attention weights ``P`` (a mix over tokens)."""
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for i in [i for n in model.graph.node for i in n.input] + [o.name for o in model.graph.output]:
        readers[i] = readers.get(i, 0) + 1  # a graph output reads its tensor too

    def step(t: str, op: str) -> onnx.NodeProto | None:
        n = producer.get(t)
        if n is None or n.op_type != op:
            return None
        if op == "Transpose" and list(_attr(n, "perm") or []) != [0, 2, 1, 3]:
            return None
        return n

    merge = step(tensor, "Reshape")
    back = merge and step(merge.input[0], "Transpose")
    mix = back and step(back.input[0], "MatMul")
    split_t = mix and step(mix.input[1], "Transpose")
    split = split_t and step(split_t.input[0], "Reshape")
    if split is None:
        return None
    for t in (merge.input[0], back.input[0], mix.input[1], split_t.input[0], split.input[0]):
        if readers.get(t, 0) != 1:
            return None  # another reader would see the scaled values
    v = producer.get(split.input[0])
    bias = None
    if v is not None and v.op_type == "Add":
        consts = [i for i in v.input if _constant(model, i) is not None]
        others = [i for i in v.input if i not in consts]
        if len(consts) != 1 or len(others) != 1 or readers.get(others[0], 0) != 1:
            return None
        bias, v = consts[0], producer.get(others[0])
    if v is None or v.op_type != "MatMul" or v.input[1] not in inits or len(inits[v.input[1]].dims) != 2:
        return None
    width = inits[v.input[1]].dims[1]
    if bias is not None and _constant(model, bias).shape != (width,):
        return None
    return v, v.input[1], bias


INPUT_KINDS = ("qkv", "attention_output", "ffn_input", "ffn_output")
"""What a Linear input tensor is in a BERT-style layer (:func:`input_kinds`): the query/key/value
Linears' shared input, the attention context (the output projection's input), the FFN's first Linear's
input, the FFN's second Linear's input (a GELU output)."""


def input_kinds(model: onnx.ModelProto, groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{input tensor: kind}`` (one of :data:`INPUT_KINDS`) for the groups of :func:`linear_inputs`:
    ``"attention_output"`` where :func:`attention_context_source` finds the value Linear, ``"ffn_output"``
    where the input is a GELU output (``hf.int8.after_gelu``), ``"qkv"`` for an input read by three or
    more Linears, ``"ffn_input"`` for the rest."""
    from .int8 import after_gelu

    gelu = set(after_gelu(model))
    kinds = {}
    for tensor, names in groups.items():
        if attention_context_source(model, tensor) is not None:
            kinds[tensor] = "attention_output"
        elif any(n in gelu for n in names):
            kinds[tensor] = "ffn_output"
        elif len(names) >= 3:
            kinds[tensor] = "qkv"
        else:
            kinds[tensor] = "ffn_input"
    return kinds


def smooth(
    model: onnx.ModelProto, groups: Mapping[str, Sequence[str]], stats: Mapping[str, InputStats], alpha: float, *, only: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, dict[str, InputStats]]:
    """SmoothQuant with migration strength ``alpha`` in [0, 1] on every group of ``groups`` (or the
    input tensors named in ``only``), see the module docstring. Returns a new graph (a folded group's
    Linears read their input as before, with ``W' = diag(s) W``; the others read ``<input>_smoothed``)
    and the stats of the Linears' inputs as the new graph has them (exact: the calibrated per-channel
    range divided by ``s``), keyed by the tensor the Linears now read."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    unknown = sorted(set(only or ()) - set(groups))
    if unknown:
        raise ValueError(f"only names {unknown[:3]}, not Linear inputs of groups")
    m = copy.deepcopy(model)
    inits = _inits(m)
    by_name = {n.name: n for n in m.graph.node}
    new_stats: dict[str, InputStats] = {}
    for tensor, names in groups.items():
        if only is not None and tensor not in only:
            if tensor in stats:
                new_stats[tensor] = stats[tensor]
            continue
        weights = [numpy_helper.to_array(inits[by_name[n].input[1]]) for n in names]
        w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)
        s = np.power(np.maximum(stats[tensor].absmax, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.maximum(s, 1e-5).astype(np.float32)
        source = attention_context_source(m, tensor)
        if source is not None:
            v, w_name, b_name = source
            n_init = len(m.graph.initializer)
            w_v = numpy_helper.from_array((numpy_helper.to_array(inits[w_name]) / s[None, :]).astype(np.float32), f"{w_name}_smooth_folded_{n_init}")
            m.graph.initializer.append(w_v)  # new tensors: a weight shared elsewhere keeps its value there
            inits[w_v.name] = w_v
            v.input[1] = w_v.name
            if b_name is not None:
                add = next(n for n in m.graph.node if v.output[0] in n.input and b_name in n.input)
                b_v = numpy_helper.from_array((_constant(m, b_name) / s).astype(np.float32), f"{b_name}_smooth_folded_{n_init}")
                m.graph.initializer.append(b_v)
                inits[b_v.name] = b_v
                add.input[list(add.input).index(b_name)] = b_v.name
            out = tensor
        else:
            out = f"{tensor}_smoothed"
            inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{tensor}_smooth_inv_scale")
            m.graph.initializer.append(inv)
            mul = helper.make_node("Mul", [tensor, inv.name], [out], name=f"{tensor}_SmoothQuant_Mul")
            first = min(i for i, n in enumerate(m.graph.node) if n.name in names)
            m.graph.node.insert(first, mul)
        for n, w in zip(names, weights):
            node = by_name[n]
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32), f"{node.input[1]}_smoothed_{len(m.graph.initializer)}")
            m.graph.initializer.append(scaled)  # a new tensor: a weight shared elsewhere keeps its value there
            inits[scaled.name] = scaled
            node.input[0], node.input[1] = out, scaled.name
        new_stats[out] = InputStats(stats[tensor].lo / s, stats[tensor].hi / s)  # s > 0: the order holds
    return m, new_stats


def _bias_add(model: onnx.ModelProto, matmul: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], n_out: int) -> tuple[onnx.NodeProto, str] | None:
    """The ``Add`` of a constant (n_out,) bias that alone reads ``matmul``'s output, and the bias name."""
    readers = [n for n in model.graph.node if matmul.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or matmul.output[0] in (o.name for o in model.graph.output):
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    if other not in inits or tuple(inits[other].dims) != (n_out,):
        return None
    return add, other


def quantize_linears(
    model: onnx.ModelProto,
    groups: Mapping[str, Sequence[str]],
    stats: Mapping[str, InputStats],
    *,
    flavour: str = "qdq",
    reduce_range: bool = False,
) -> onnx.ModelProto:
    """A new graph whose Linears in ``groups`` (``{input tensor: [MatMul names]}``) are int8 in
    ``flavour`` (one of :data:`FLAVOURS`); ``stats`` has each input tensor's calibrated range (not read
    by ``"dynamic"``). Raises ``ValueError`` for an unknown flavour or a group without stats."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    missing = [t for t in groups if flavour != "dynamic" and t not in stats]
    if missing:
        raise ValueError(f"no calibration stats for the Linear input {missing[0]!r}")
    m = copy.deepcopy(model)
    inits = _inits(m)
    by_name = {n.name: n for n in m.graph.node}
    qmax = 63 if reduce_range else 127
    drop: list[onnx.NodeProto] = []
    for tensor, names in groups.items():
        first = min(i for i, n in enumerate(m.graph.node) if n.name in names)
        pre: list[onnx.NodeProto] = []
        fused_dynamic = flavour == "dynamic" and len(names) == 1  # one reader: onnxruntime's DynamicQuantizeMatMul
        if fused_dynamic:
            pass
        elif flavour == "dynamic":
            q, a_scale, a_zp = f"{tensor}_dq8", f"{tensor}_dq8_scale", f"{tensor}_dq8_zp"
            pre.append(helper.make_node("DynamicQuantizeLinear", [tensor], [q, a_scale, a_zp], name=f"{tensor}_DynamicQuantizeLinear"))
        else:
            scale, zp = stats[tensor].uint8()
            a_scale, a_zp, q = f"{tensor}_scale", f"{tensor}_zero_point", f"{tensor}_quantized"
            m.graph.initializer.extend([numpy_helper.from_array(np.array(scale), a_scale), numpy_helper.from_array(np.array(zp), a_zp)])
            pre.append(helper.make_node("QuantizeLinear", [tensor, a_scale, a_zp], [q], name=f"{tensor}_QuantizeLinear"))
            if flavour == "qdq":
                pre.append(helper.make_node("DequantizeLinear", [q, a_scale, a_zp], [f"{tensor}_dequantized"], name=f"{tensor}_DequantizeLinear"))
        for node in pre[::-1]:
            m.graph.node.insert(first, node)
        for name in names:
            node = by_name[name]
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            w_scale = np.maximum(np.abs(w).max(0), 1e-12) / qmax  # per output channel (axis 1 of (in, out))
            wq = np.clip(np.round(w / w_scale), -qmax, qmax).astype(np.int8)
            base = node.input[1]
            m.graph.initializer.extend([
                numpy_helper.from_array(wq, f"{base}_int8"), numpy_helper.from_array(w_scale.astype(np.float32), f"{base}_w_scale"),
                numpy_helper.from_array(np.zeros(wq.shape[1], np.int8), f"{base}_w_zero_point"),
            ])  # fmt: skip
            if flavour == "qdq":
                dq = helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_w_scale", f"{base}_w_zero_point"], [f"{base}_dequantized"], name=f"{name}_weight_DequantizeLinear", axis=1)
                m.graph.node.insert(list(m.graph.node).index(node), dq)
                node.input[0], node.input[1] = f"{tensor}_dequantized", f"{base}_dequantized"
                continue
            if fused_dynamic:
                ins, op = [tensor, f"{base}_int8", f"{base}_w_scale", f"{base}_w_zero_point"], "DynamicQuantizeMatMul"
            else:
                ins, op = [q, f"{base}_int8", a_scale, f"{base}_w_scale", a_zp, f"{base}_w_zero_point"], "MatMulIntegerToFloat"
            out, bias = node.output[0], _bias_add(m, node, inits, wq.shape[1])
            if bias is not None:
                ins.append(bias[1])
                out = bias[0].output[0]
                drop.append(bias[0])
            mm = helper.make_node(op, ins, [out], name=f"{name}_{op}", domain=MS_DOMAIN)
            m.graph.node.insert(list(m.graph.node).index(node), mm)
            drop.append(node)
    for n in drop:
        m.graph.node.remove(n)
    if flavour != "qdq" and MS_DOMAIN not in {o.domain for o in m.opset_import}:
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used or i.name in {x.name for x in m.graph.input}]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


ATTENTION_MATMULS = ("scores", "context")
"""The two attention MatMuls of a layer: ``"scores"`` (``Q K^T``) and ``"context"`` (the attention
probabilities times ``V``, its input A a ``Softmax`` output, see :func:`attention_probabilities`)."""


def attention_probabilities(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether ``tensor`` is a ``Softmax`` output, directly or through what leaves its values as they are:
    ``Identity``, ``Cast``, ``Dropout`` (inference), or the NaN guard ``Where(IsNaN(p), c, p)`` that the
    export of ``scaled_dot_product_attention`` writes (``transformers``' default ``attn_implementation="sdpa"``,
    DistilBERT's; ``p`` the ``Softmax`` output, ``c`` a constant: it changes nothing but NaNs)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = set(_inits(model)) | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return _probabilities(producer, consts, tensor)


def _probabilities(producer: Mapping[str, onnx.NodeProto], consts: set[str], tensor: str) -> bool:
    for _ in range(4):
        p = producer.get(tensor)
        if p is None:
            return False
        if p.op_type == "Softmax":
            return True
        if p.op_type in ("Identity", "Cast", "Dropout"):
            tensor = p.input[0]
            continue
        if p.op_type == "Where" and len(p.input) == 3:
            cond = producer.get(p.input[0])
            if cond is not None and cond.op_type == "IsNaN" and p.input[1] in consts and cond.input[0] == p.input[2]:
                tensor = p.input[2]
                continue
        return False
    return False


def attention_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """``{MatMul node name: "scores" | "context"}`` for the MatMuls whose two inputs are activations (no
    initializer, no Transpose of one): ``"context"`` when input A holds attention probabilities
    (:func:`attention_probabilities`: a ``Softmax`` output, directly or through the ``Where(IsNaN(p), 0, p)``
    that the export of ``scaled_dot_product_attention`` -- ``transformers``' default
    ``attn_implementation="sdpa"``, DistilBERT's -- puts after it, or a ``Cast``/``Identity``/``Dropout``), else ``"scores"``."""
    consts = set(_inits(model)) | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant(t: str) -> bool:
        p = producer.get(t)
        return t in consts or (p is not None and p.op_type in ("Transpose", "Identity") and p.input[0] in consts)

    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and not constant(n.input[0]) and not constant(n.input[1]):
            out[n.name] = "context" if _probabilities(producer, consts, n.input[0]) else "scores"
    return out


def quantize_attention_matmuls(model: onnx.ModelProto, kinds: Sequence[str] = ("context",)) -> onnx.ModelProto:
    """A new graph whose attention MatMuls of ``kinds`` (of :data:`ATTENTION_MATMULS`, see
    :func:`attention_matmuls`) read uint8 inputs: ``DynamicQuantizeLinear`` on input A and on input B
    (per tensor, asymmetric, the range measured per call as in the ONNX spec) ``->
    MatMulIntegerToFloat`` (onnxruntime's ``com.microsoft`` op; batched N-D inputs), writing the MatMul's
    output tensor. Raises ``ValueError`` for an unknown kind or a graph with no such MatMul."""
    unknown = sorted(set(kinds) - set(ATTENTION_MATMULS))
    if unknown:
        raise ValueError(f"kinds must be among {ATTENTION_MATMULS}, got {unknown}")
    m = copy.deepcopy(model)
    chosen = [name for name, kind in attention_matmuls(m).items() if kind in kinds]
    if not chosen:
        raise ValueError(f"no attention MatMul of kinds {tuple(kinds)} in this graph (MatMuls with two activation inputs)")
    by_name = {n.name: n for n in m.graph.node}
    for name in chosen:
        node = by_name[name]
        idx = list(m.graph.node).index(node)
        names = []
        for side, t in zip("ab", node.input):
            q = f"{name}_{side}_dq8"
            names.append((q, f"{q}_scale", f"{q}_zp"))
            m.graph.node.insert(idx, helper.make_node("DynamicQuantizeLinear", [t], list(names[-1]), name=f"{name}_{side}_DynamicQuantizeLinear"))
            idx += 1
        (qa, sa, za), (qb, sb, zb) = names
        mm = helper.make_node("MatMulIntegerToFloat", [qa, qb, sa, sb, za, zb], [node.output[0]], name=f"{name}_MatMulIntegerToFloat", domain=MS_DOMAIN)
        m.graph.node.insert(idx, mm)
        m.graph.node.remove(node)
    if MS_DOMAIN not in {o.domain for o in m.opset_import}:
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return m

"""int8 (QDQ) transformer encoders for onnxruntime: every Linear's MatMul/Gemm in int8, the rest float.

What is quantized: each MatMul/Gemm whose weight (input B) is a constant -- the Linears -- per output
channel (symmetric int8 weights, uint8 activations, the U8S8 flavour onnxruntime's x86 kernels run
fastest; 7-bit weights on x86 without VNNI, see ``export.qdq.needs_reduced_range``). Softmax,
LayerNorm, GELU and the residual adds stay float. The attention-score MatMuls (``q @ k^T``,
``p @ v``: both inputs activations) are quantized only with ``score_matmuls=True``.

Which graph: onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``) fuses
LayerNorm/SkipLayerNorm, bias+GELU and the embedding; its attention fusion packs Q/K/V into one
``Attention`` op whose weights the QDQ quantizer leaves float, so it is turned off. Both the plain
exported graph and the fused one are quantized (onnxruntime's ``quantize_static``, QDQ format, on the
caller's calibration batches) and timed on the same batches; the faster one whose outputs stay within
``min_cosine`` of the fp32 graph's is kept, and the result says why (:class:`Int8Result`).

The spec followed: onnxruntime's quantization guide (QDQ format, per-channel weights, U8S8 on x86).
Dynamic axes of the fp32 graph (batch, sequence) are kept.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import StepError
from ..export.qdq import needs_reduced_range

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]

__all__ = ["Int8Candidate", "Int8Error", "Int8Result", "after_gelu", "fused_graph", "linear_matmuls", "mean_cosine", "quantize_transformer"]


class Int8Error(StepError, RuntimeError):
    """No int8 graph met the accuracy bound (the candidates are named with their figures)."""


@dataclass
class Int8Candidate:
    """One int8 graph tried: its fp32 source (``"plain"`` or ``"fused"``), speed and accuracy."""

    name: str
    model: onnx.ModelProto = field(repr=False)
    quantized: int  # MatMul/Gemm nodes with int8 weights
    linears: int  # MatMul/Gemm nodes with constant weights in its fp32 source
    latency_ms: float  # median over the timing batches, one batch at a time
    cosine: float  # mean cosine of its outputs to the fp32 graph's, over the check batches (rows of the last axis)
    accepted: bool = False


@dataclass
class Int8Result:
    """The kept int8 graph and every candidate tried, with the fp32 graph's latency for comparison."""

    model: onnx.ModelProto = field(repr=False)
    chosen: str
    candidates: list[Int8Candidate]
    fp32_latency_ms: float
    notes: list[str] = field(default_factory=list)


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }


def linear_matmuls(model: onnx.ModelProto, *, score_matmuls: bool = False) -> list[str]:
    """Names of the MatMul/Gemm nodes that are Linears (input B a constant, possibly through a Transpose);
    with ``score_matmuls`` also those whose both inputs are activations (attention scores)."""
    consts = _initializers(model)
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in consts}
    names = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        if not n.name:
            raise ValueError("every MatMul/Gemm node needs a name to be selected for quantization")
        if n.input[1] in consts or n.input[1] in transposed or score_matmuls:
            names.append(n.name)
    return names


_GELU_OPS = ("Gelu", "BiasGelu", "FastGelu", "QuickGelu")


def after_gelu(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes reading a GELU output (the FFN's second Linear): a GELU op, or the exporter's
    ``x * 0.5 * (1 + erf(x / sqrt 2))`` (a Mul with an Erf at most three nodes up)."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def is_gelu(name: str) -> bool:
        n = producer.get(name)
        if n is None:
            return False
        if n.op_type in _GELU_OPS:
            return True
        if n.op_type != "Mul":
            return False
        frontier, seen = list(n.input), 0
        while frontier and seen < 12:
            p = producer.get(frontier.pop())
            seen += 1
            if p is None:
                continue
            if p.op_type == "Erf":
                return True
            if p.op_type in ("Mul", "Add", "Div"):
                frontier += list(p.input)
        return False

    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and is_gelu(n.input[0])]


def fused_graph(model: onnx.ModelProto, num_heads: int = 0, hidden_size: int = 0) -> onnx.ModelProto:
    """``model`` through onnxruntime's BERT optimizer: LayerNorm/SkipLayerNorm, bias+GELU and embedding
    fusions on, attention fusion off (it would hide Q/K/V weights from the quantizer)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_skip_layer_norm = True
    options.enable_bias_skip_layer_norm = True
    optimized = optimize_model(model, "bert", num_heads, hidden_size, optimization_options=options, opt_level=0)
    out = optimized.model
    domains = {n.domain for n in out.graph.node if n.domain} - {o.domain for o in out.opset_import}
    for d in sorted(domains):  # the contrib ops' domain, which the optimizer does not always declare
        out.opset_import.append(onnx.helper.make_opsetid(d, 1))
    for i, n in enumerate(out.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._it = iter(list(feeds))

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:  # not needed by MinMax; part of the protocol
        pass


def _session(model: onnx.ModelProto, threads: int | None):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _outputs(sess, feeds: Sequence[Feeds]) -> list[np.ndarray]:  # noqa: ANN001
    return [sess.run(None, dict(f))[0] for f in feeds]


def _latency_ms(sess, feeds: Sequence[Feeds], repeats: int) -> float:  # noqa: ANN001
    for f in feeds[:2]:
        sess.run(None, dict(f))  # warm-up
    times = []
    for _ in range(repeats):
        for f in feeds:
            t = time.perf_counter()
            sess.run(None, dict(f))
            times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def mean_cosine(reference: Iterable[np.ndarray], actual: Iterable[np.ndarray]) -> float:
    """Mean cosine similarity between matching rows (last axis) of two output lists."""
    cos = []
    for r, a in zip(reference, actual):
        r2, a2 = r.reshape(-1, r.shape[-1]).astype(np.float64), a.reshape(-1, a.shape[-1]).astype(np.float64)
        denom = np.linalg.norm(r2, axis=1) * np.linalg.norm(a2, axis=1)
        cos.append((r2 * a2).sum(1) / np.maximum(denom, 1e-12))
    return float(np.concatenate(cos).mean())


def _quantize(model: onnx.ModelProto, feeds: Sequence[Feeds], nodes: list[str], reduce_range: bool, score_matmuls: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static(
            str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "MatMulConstBOnly": not score_matmuls, "WeightSymmetric": True, "ActivationSymmetric": False,
                "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],  # their outputs feed float bias adds and norms
            },
        )  # fmt: skip
        return _float_ops_read_float(onnx.load(str(dst)))


def _float_ops_read_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewire every non-MatMul/Gemm reader of a quantize-dequantized activation to the float tensor.

    onnxruntime's quantizer puts one Q/DQ pair on a tensor and lets all its readers share the
    dequantized copy, so a residual add or LayerNorm reading the same hidden states as a quantized
    Linear would see rounded values; here they read what the fp32 graph read.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    float_of = {}
    for n in model.graph.node:
        q = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            float_of[n.output[0]] = q.input[0]
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(n.input):
            if name in float_of:
                n.input[i] = float_of[name]
    return model


def _count_quantized(model: onnx.ModelProto) -> int:
    """MatMul/Gemm nodes whose weight input comes from a DequantizeLinear of a constant."""
    consts = _initializers(model)
    dq_const = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    return sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in dq_const)


def quantize_transformer(
    model: onnx.ModelProto,
    calibration: Sequence[Feeds],
    check: Sequence[Feeds] | None = None,
    *,
    fuse: str = "auto",
    float_after_gelu: bool | str = "auto",
    min_cosine: float = 0.99,
    score_matmuls: bool = False,
    num_heads: int = 0,
    hidden_size: int = 0,
    threads: int | None = None,
    repeats: int = 3,
) -> Int8Result:
    """int8 QDQ graph of an fp32 encoder graph (see the module docstring).

    ``calibration``: feed dicts ``{input name: array}`` (e.g. ``input_ids``/``attention_mask``, int64,
    (batch, sequence)) of real text; ``check`` (default: ``calibration``) the batches that time the
    candidates and measure their mean cosine to fp32 outputs. ``fuse``: ``"auto"`` tries the plain and
    the fused graph and keeps the faster one with cosine >= ``min_cosine``; ``"plain"``/``"fused"``
    try one. ``float_after_gelu``: keep the Linears that read a GELU output (the FFN's second Linear,
    whose input has outliers per-tensor uint8 cannot cover) in float: ``False`` never, ``True``
    always, ``"auto"`` only for a graph whose all-int8 version misses ``min_cosine`` (said in the
    result's notes and logged). ``num_heads``/``hidden_size`` help the optimizer (0: detected). Raises ``ValueError`` for
    bad arguments (before any work) and :class:`Int8Error` when no candidate is accurate enough.
    """
    if fuse not in ("auto", "plain", "fused"):
        raise ValueError(f"fuse must be 'auto', 'plain' or 'fused', got {fuse!r}")
    if float_after_gelu not in (True, False, "auto"):
        raise ValueError(f"float_after_gelu must be True, False or 'auto', got {float_after_gelu!r}")
    if not calibration:
        raise ValueError("calibration needs at least one feed dict of real inputs")
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    for i, f in enumerate(list(calibration) + list(check or [])):
        if set(f) != inputs:
            raise ValueError(f"feed {i} has inputs {sorted(f)}; the graph reads {sorted(inputs)}")
    check = list(check or calibration)
    fp32 = _session(model, threads)
    reference = _outputs(fp32, check)
    result_notes: list[str] = []
    sources = {"plain": model} if fuse == "plain" else {}
    if fuse in ("auto", "fused"):
        try:
            sources["fused"] = fused_graph(model, num_heads, hidden_size)
        except Exception as exc:  # noqa: BLE001 - the optimizer fails on graphs it does not know; plain stays
            if fuse == "fused":
                raise
            result_notes.append(f"onnxruntime's transformer optimizer failed ({exc}); the plain graph is used")
            log.warning(result_notes[-1])
    if fuse == "auto":
        sources = {"plain": model, **sources}
    reduce_range = needs_reduced_range()
    candidates = []
    for name, src in sources.items():
        gelu = set(after_gelu(src))
        plans = {True: [True], False: [False], "auto": [False, True]}[float_after_gelu]
        for keep_float in plans:
            nodes = [n for n in linear_matmuls(src, score_matmuls=score_matmuls) if not (keep_float and n in gelu)]
            label = f"{name}+float-ffn2" if keep_float else name
            q = _quantize(src, calibration, nodes, reduce_range, score_matmuls)
            sess = _session(q, threads)
            cand = Int8Candidate(label, q, _count_quantized(q), len(linear_matmuls(src)), _latency_ms(sess, check, repeats), mean_cosine(reference, _outputs(sess, check)))
            cand.accepted = cand.cosine >= min_cosine
            log.info("int8 %s graph: %d/%d Linears int8, %.2f ms, cosine %.5f", label, cand.quantized, cand.linears, cand.latency_ms, cand.cosine)
            candidates.append(cand)
            if cand.accepted:
                break
            if float_after_gelu == "auto" and not keep_float and gelu:
                result_notes.append(
                    f"{name}: all {cand.linears} Linears in int8 reach cosine {cand.cosine:.4f} < {min_cosine}; "
                    f"trying the {len(gelu)} Linears after GELU in float"
                )
                log.warning(result_notes[-1])
    fp32_ms = _latency_ms(fp32, check, repeats)
    ok = [c for c in candidates if c.accepted]
    if not ok:
        shown = "; ".join(f"{c.name}: cosine {c.cosine:.4f}" for c in candidates)
        raise Int8Error(f"no int8 graph keeps cosine >= {min_cosine} to fp32 ({shown}); calibrate on more representative text")
    best = min(ok, key=lambda c: c.latency_ms)
    if best.quantized < best.linears:
        result_notes.append(f"{best.name}: {best.linears - best.quantized} of {best.linears} Linears stay float")
    result_notes.append(f"kept the {best.name} graph: {best.latency_ms:.2f} ms vs fp32 {fp32_ms:.2f} ms, cosine {best.cosine:.5f}")
    return Int8Result(best.model, best.name, candidates, fp32_ms, result_notes)

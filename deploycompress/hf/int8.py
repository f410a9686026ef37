"""int8 transformer encoders for onnxruntime: every Linear's MatMul in int8, the rest float.

What is quantized: each MatMul whose weight (input B) is a constant -- the Linears -- with symmetric
int8 weights per output channel and uint8 activations per tensor (the U8S8 flavour onnxruntime's x86
kernels run fastest; 7-bit weights on x86 without VNNI, see ``export.qdq.needs_reduced_range``).
Softmax, LayerNorm, GELU and the residual adds stay float and read float tensors; the attention
context MatMuls (softmax output times values) optionally int8 too (``attention_int8``). The graph is
written by :mod:`.linear_int8` (calibration, SmoothQuant, the ``qdq``/``integer``/``dynamic`` flavours).

Accuracy: BERT-family encoders have a few activation channels with outliers 10-15x the others in the
LayerNorm outputs (the FFN's first Linear) and after GELU (the FFN's second Linear); one per-tensor
uint8 scale then rounds every other channel coarsely. ``smooth_alpha`` applies SmoothQuant (Xiao et
al., 2023) to every Linear input before quantizing; Linears named in ``keep_float`` stay float (named
in the result).

Which graph: onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``) fuses
LayerNorm/SkipLayerNorm, bias+GELU and the embedding; its attention fusion packs Q/K/V into one
``Attention`` op whose weights would be hidden, so it is turned off. The plain exported graph and the
fused one, each in every flavour asked, are timed on the same batches; the fastest whose outputs keep
mean cosine >= ``min_cosine`` to the fp32 graph's (and, when asked, nearest-neighbour agreement >=
``min_nn_agreement``) is kept, and the result says why (:class:`Int8Result`). Cosine alone can hide a
retrieval loss (on all-MiniLM-L6-v2, cosine 0.997 went with NN agreement 94-95 %): a kept graph whose
nearest-neighbour agreement on the check batches is under :data:`NN_AGREEMENT_WARN` raises a
:class:`RetrievalAgreementWarning` when no ``min_nn_agreement`` was given.

The spec followed: onnxruntime's quantization guide (QDQ format, per-channel weights, U8S8 on x86) and
its ``com.microsoft`` ``MatMulIntegerToFloat``/``DynamicQuantizeLinear`` operators.
Dynamic axes of the fp32 graph (batch, sequence) are kept.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..errors import StepError
from ..export.qdq import needs_reduced_range
from ..similarity import row_cosines

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]

SMOOTH_ALPHA = 0.85
"""Default SmoothQuant migration strength. On all-MiniLM-L6-v2 (all Linears int8, 512 held-out
sentences; cosine / nearest-neighbour agreement to fp32, static flavour): 0.5 0.987 / 85.5%, 0.75
0.9979 / 94.7%, 0.8 0.9983 / 95.9%, 0.85 0.9982 / 96.5%, 0.9 0.9982 / 95.5%; on another 512 sentences
0.75 / 0.8 / 0.85: 93.8% / 93.6% / 94.9% (cosine 0.998 throughout)."""

NN_AGREEMENT_WARN = 0.95
"""Nearest-neighbour agreement (:func:`nn_agreement`) under which a kept int8 graph is named in a
:class:`RetrievalAgreementWarning` (issue 16's retrieval bound), on at least :data:`NN_MIN_ROWS` rows."""

NN_TIE = 1e-6
"""Cosine difference under which two rows are equally near in the reference (:func:`nn_agreement`): fp32 outputs of
one sentence in two batches differ by ~1e-7, and int8 noise must not turn that tie into a changed neighbour."""

NN_MIN_ROWS = 100
"""Check rows (examples) under which the agreement is too coarse to warn about (one changed neighbour in
16 rows is 94 %): the result's notes give the figure instead."""

__all__ = [
    "NN_AGREEMENT_WARN", "NN_MIN_ROWS", "NN_TIE", "SMOOTH_ALPHA", "Int8Candidate", "Int8Error", "Int8Result", "RetrievalAgreementWarning", "after_gelu", "feed_list", "fused_graph",
    "is_classifier_scores", "linear_matmuls", "mean_cosine", "nn_agreement", "quantize_transformer", "retrieval_outputs",
]  # fmt: skip


class Int8Error(StepError, RuntimeError):
    """No int8 graph met the accuracy bound (the candidates are named with their figures)."""


class RetrievalAgreementWarning(UserWarning):
    """The kept int8 graph keeps mean cosine but changes the nearest neighbour of more than
    ``1 - NN_AGREEMENT_WARN`` of the check rows (pass ``min_nn_agreement`` to make it a bound)."""


@dataclass
class Int8Candidate:
    """One int8 graph tried, named ``<source>/<flavour>`` (source ``"plain"`` or ``"fused"``, flavour
    of :data:`.linear_int8.FLAVOURS`, ``+float-ffn2`` when the FFN's second Linears stay float,
    ``+context-int8`` when the attention context MatMuls are int8 too)."""

    name: str
    model: onnx.ModelProto = field(repr=False)
    quantized: int  # MatMul/Gemm nodes with int8 weights
    linears: int  # MatMul/Gemm nodes with constant weights in its fp32 source
    latency_ms: float  # median over the timing batches, one batch at a time
    cosine: float  # mean cosine to the fp32 graph's over the check batches (rows of the last axis), its lowest output's
    nn_agreement: float = float("nan")  # nn_agreement with the fp32 graph over the check batches, its lowest retrieval output's (NaN: none)
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
    """A new graph: ``model`` through onnxruntime's BERT optimizer: LayerNorm/SkipLayerNorm, bias+GELU
    and embedding fusions on, attention fusion off (it would hide Q/K/V weights from the quantizer).
    ``model`` itself is left as it was."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_skip_layer_norm = True
    options.enable_bias_skip_layer_norm = True
    # a copy: the optimizer rewrites the ModelProto it is given in place (the caller's graph would change)
    optimized = optimize_model(copy.deepcopy(model), "bert", num_heads, hidden_size, optimization_options=options, opt_level=0)
    out = optimized.model
    domains = {n.domain for n in out.graph.node if n.domain} - {o.domain for o in out.opset_import}
    for d in sorted(domains):  # the contrib ops' domain, which the optimizer does not always declare
        out.opset_import.append(onnx.helper.make_opsetid(d, 1))
    for i, n in enumerate(out.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return out


def feed_list(feeds: Any, what: str, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """``feeds`` as a list of ``{input name: numpy array}``, read once: a list, generator or DataLoader of dicts
    (torch tensors become arrays) or of tuples in the graph's input order ``names``; one dict is one feed.
    ``ValueError`` naming the item and what to pass otherwise (a generator used to be consumed by the input check
    and calibrate on nothing: ``KeyError`` of a tensor name)."""
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    out = []
    for i, f in enumerate(feeds):
        if isinstance(f, (tuple, list)):
            if len(f) != len(names):
                raise ValueError(f"{what} item {i} is a {type(f).__name__} of {len(f)}; the graph reads {list(names)} (in this order): "
                                 "pass that many arrays or dicts keyed by input name")
            f = dict(zip(names, f))
        if not isinstance(f, Mapping):
            raise ValueError(f"{what} item {i} is a {type(f).__name__}; pass dicts {{input name: array}} (e.g. {list(names)})")
        out.append({k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in f.items()})
    return out


def _session(model: onnx.ModelProto, threads: int | None):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _outputs(sess, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:  # noqa: ANN001
    """Every graph output on every feed: one list per output (graph order), one array per feed."""
    return [list(o) for o in zip(*(sess.run(None, dict(f)) for f in feeds))]


def _worst_cosine(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> float:
    """The lowest :func:`mean_cosine` over the graph's outputs: each output (e.g. ``pooler_output`` next to
    ``last_hidden_state``) is held to ``min_cosine``, not the first one alone."""
    return min(mean_cosine(r, a) for r, a in zip(reference, actual))


def _worst_nn_agreement(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]], which: Sequence[int]) -> float:
    """The lowest :func:`nn_agreement` over the graph outputs ``which`` (indices; the retrieval outputs of
    :func:`retrieval_outputs`); NaN when there is none (token-level outputs and classifier scores are not a retrieval)."""
    figures = [nn_agreement(reference[i], actual[i]) for i in which]
    return min(figures) if figures else float("nan")


def is_classifier_scores(name: str) -> bool:
    """Whether a graph output is a classifier's scores by its name (Hugging Face's ``logits``, ``start_logits``,
    ``seq_relationship_logits``, ...): nearest neighbours among rows of class scores say nothing about retrieval."""
    return "logits" in name.lower()


def retrieval_outputs(names: Sequence[str], reference: list[list[np.ndarray]], nn_outputs: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Indices of the outputs whose rows :func:`nn_agreement` compares and the 2-D outputs left out by name:
    ``nn_outputs`` as given (each must be a 2-D output), or (``None``) every 2-D (batch, features) output except
    classifier scores (:func:`is_classifier_scores`). ``ValueError`` for a name that is no 2-D graph output."""
    two_d = [i for i, r in enumerate(reference) if r and r[0].ndim == 2]
    if nn_outputs is None:
        return [i for i in two_d if not is_classifier_scores(names[i])], [names[i] for i in two_d if is_classifier_scores(names[i])]
    if isinstance(nn_outputs, str):
        nn_outputs = [nn_outputs]
    bad = [n for n in nn_outputs if n not in names or names.index(n) not in two_d]
    if bad:
        raise ValueError(f"nn_outputs names {bad}, not 2-D (batch, features) outputs of this graph (its 2-D outputs: {[names[i] for i in two_d]})")
    return [names.index(n) for n in nn_outputs], []


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
    """Mean cosine similarity between matching rows (last axis) of two output lists. 0-d arrays (a scalar
    output, one per batch) are gathered into one row over the batches: a scalar's own cosine would be its sign."""
    cos, scalars = [], ([], [])
    for r, a in zip(reference, actual):
        if np.ndim(r) == 0:
            scalars[0].append(float(r))
            scalars[1].append(float(a))
            continue
        cos.append(row_cosines(r.reshape(-1, r.shape[-1]), a.reshape(-1, a.shape[-1])))
    if scalars[0]:
        cos.append(row_cosines(np.asarray([scalars[0]]), np.asarray([scalars[1]])))
    return float(np.concatenate(cos).mean())


def nn_agreement(reference: Iterable[np.ndarray], actual: Iterable[np.ndarray]) -> float:
    """Fraction of output rows (last axis; the rows of all arrays together, e.g. one pooled embedding per
    sentence) whose nearest neighbour by cosine among the other rows is the same row in ``actual`` as in
    ``reference``: the retrieval agreement of issue 16's target (b). Rows tied in ``reference`` (cosine within
    :data:`NN_TIE`, e.g. one sentence three times in different batches) are the same neighbour: ``actual`` picking
    either keeps it. NaN for fewer than 3 rows."""

    def rows(xs: Iterable[np.ndarray]) -> np.ndarray:
        return np.concatenate([x.reshape(-1, x.shape[-1]).astype(np.float64) for x in xs])

    def similarities(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim

    r, a = rows(reference), rows(actual)
    if len(r) < 3:
        return float("nan")
    ref_sim, picked = similarities(r), similarities(a).argmax(1)
    own = np.arange(len(r))
    return float((ref_sim[own, picked] >= ref_sim.max(1) - NN_TIE).mean())


def _count_quantized(model: onnx.ModelProto) -> int:
    """Linears in int8: MatMuls whose weight comes from a DequantizeLinear of a constant, and
    MatMulIntegerToFloat/DynamicQuantizeMatMul nodes with a constant weight (not the attention MatMuls)."""
    consts = _initializers(model)
    dq_const = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    return sum(
        1 for n in model.graph.node if (n.op_type in ("MatMul", "Gemm") and n.input[1] in dq_const) or (n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul") and n.input[1] in consts)
    )  # fmt: skip


def _writable(model: onnx.ModelProto) -> list[str]:
    """The Linears :mod:`.linear_int8` writes: MatMuls with a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def quantize_transformer(
    model: onnx.ModelProto | str | os.PathLike[str],
    calibration: Sequence[Feeds],
    check: Sequence[Feeds] | None = None,
    *,
    fuse: str = "auto",
    flavour: str = "auto",
    smooth_alpha: float | None = SMOOTH_ALPHA,
    keep_float: Sequence[str] = (),
    float_after_gelu: bool | str = "auto",
    attention_int8: bool | str = "auto",
    min_cosine: float = 0.99,
    min_nn_agreement: float | None = None,
    nn_outputs: Sequence[str] | None = None,
    num_heads: int = 0,
    hidden_size: int = 0,
    threads: int | None = None,
    repeats: int = 3,
) -> Int8Result:
    """int8 graph of an fp32 encoder graph (see the module docstring): ``model`` is an ``onnx.ModelProto``,
    the path of an .onnx file or what :func:`deploycompress.to_onnx` returns.

    ``calibration``: feed dicts ``{input name: array}`` (e.g. ``input_ids``/``attention_mask``, int64,
    (batch, sequence)) of real text, as a list, generator or DataLoader (read once, :func:`feed_list`; torch tensors
    and tuples in the graph's input order are taken too); ``check`` (default: ``calibration``) the batches that time the
    candidates and measure their mean cosine to the fp32 outputs (every output: the lowest counts). ``fuse``: ``"auto"`` tries the plain and
    the fused graph; ``"plain"``/``"fused"`` one. ``flavour``: ``"auto"`` tries ``"qdq"``,
    ``"integer"`` and ``"dynamic"`` (:data:`.linear_int8.FLAVOURS`), or name one. ``smooth_alpha``:
    SmoothQuant migration strength (``None``: off; default :data:`SMOOTH_ALPHA`). ``keep_float``: MatMul
    node names kept float. ``float_after_gelu``: keep the
    Linears that read a GELU output (the FFN's second Linear) in float: ``False`` never, ``True``
    always, ``"auto"`` only for a graph whose all-int8 version misses ``min_cosine`` (said in the
    result's notes and logged). ``attention_int8``: the attention context MatMuls (probabilities times
    values, :func:`.linear_int8.quantize_attention_matmuls`) in int8 too: ``False`` never, ``True`` in
    every candidate, ``"auto"`` as one more candidate, the fastest accurate one with them (on
    all-MiniLM-L6-v2 it pays at batch 8 x 128 tokens only, see BENCHMARKS.md). ``min_nn_agreement``: also
    require :func:`nn_agreement` of the check outputs' rows with fp32 >= this (every 2-D output, one row
    per example; ``ValueError`` for a graph without one) (``None``: not required, but a
    kept graph under :data:`NN_AGREEMENT_WARN` raises a :class:`RetrievalAgreementWarning` when the check
    batches hold >= :data:`NN_MIN_ROWS` rows, a note otherwise). ``nn_outputs``: the graph outputs (names) whose rows
    are embeddings for :func:`nn_agreement`; ``None``: every 2-D output except classifier scores (outputs named
    ``*logits*``, left out with a note: a ``BertForSequenceClassification`` graph has no retrieval, and
    ``min_nn_agreement`` on it is refused before any work). ``num_heads``/``hidden_size`` help the optimizer (0: detected).
    Raises ``ValueError`` for bad arguments (before any work) and :class:`Int8Error` when no
    candidate is accurate enough.
    """
    from .linear_int8 import FLAVOURS, attention_matmuls, collect_stats, linear_inputs, quantize_attention_matmuls, quantize_linears, smooth

    if isinstance(getattr(model, "model", None), onnx.ModelProto):  # what deploycompress.to_onnx returns
        model = model.model
    if isinstance(model, (str, os.PathLike)):  # a path, as onnxruntime's quantizers take it
        if not Path(model).is_file():
            raise ValueError(f"model: {str(model)!r} is not a file (give an .onnx path or an onnx.ModelProto)")
        model = onnx.load(str(model))
    elif not isinstance(model, onnx.ModelProto):
        raise ValueError(f"model must be an onnx.ModelProto or the path of an .onnx file, got {type(model).__name__}")
    if fuse not in ("auto", "plain", "fused"):
        raise ValueError(f"fuse must be 'auto', 'plain' or 'fused', got {fuse!r}")
    if flavour != "auto" and flavour not in FLAVOURS:
        raise ValueError(f"flavour must be 'auto' or one of {FLAVOURS}, got {flavour!r}")
    if float_after_gelu not in (True, False, "auto"):
        raise ValueError(f"float_after_gelu must be True, False or 'auto', got {float_after_gelu!r}")
    if attention_int8 not in (True, False, "auto"):
        raise ValueError(f"attention_int8 must be True, False or 'auto', got {attention_int8!r}")
    if isinstance(smooth_alpha, bool):  # False would read as alpha 0, which still smooths
        raise ValueError(f"smooth_alpha must be a number in [0, 1] or None (None: no SmoothQuant), got {smooth_alpha!r}")
    if smooth_alpha is not None and not 0.0 <= smooth_alpha <= 1.0:
        raise ValueError(f"smooth_alpha must be in [0, 1] or None, got {smooth_alpha}")
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    calibration = feed_list(calibration, "calibration", names)
    check = None if check is None else feed_list(check, "check", names)
    if not calibration:
        raise ValueError("calibration needs at least one feed dict of real inputs")
    if isinstance(min_cosine, bool) or not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be a number in (0, 1], got {min_cosine!r}")
    if min_nn_agreement is not None and (isinstance(min_nn_agreement, bool) or not 0.0 < min_nn_agreement <= 1.0):
        raise ValueError(f"min_nn_agreement must be a number in (0, 1] or None, got {min_nn_agreement!r}")
    unknown = sorted(set(keep_float) - set(linear_matmuls(model)))
    if unknown:
        raise ValueError(f"keep_float names {unknown[:3]}, not Linear MatMuls of this graph (see linear_matmuls(model))")
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    for i, f in enumerate(list(calibration) + list(check or [])):
        if set(f) != inputs:
            raise ValueError(f"feed {i} has inputs {sorted(f)}; the graph reads {sorted(inputs)}")
    check = list(check or calibration)
    fp32 = _session(model, threads)
    reference = _outputs(fp32, check)
    out_names = [o.name for o in fp32.get_outputs()]
    nn_which, scores = retrieval_outputs(out_names, reference, nn_outputs)
    if min_nn_agreement is not None and scores and not nn_which:
        raise ValueError(f"min_nn_agreement: the graph's 2-D outputs {scores} are classifier scores, whose nearest neighbours are no retrieval; "
                         "drop min_nn_agreement (min_cosine bounds them), or name an embedding output with nn_outputs=[...]")
    if min_nn_agreement is not None and not nn_which:
        raise ValueError(f"min_nn_agreement needs a 2-D graph output (batch, features), e.g. a pooled embedding; the outputs have shapes {[r[0].shape for r in reference]}")
    rows = min((sum(len(x) for x in reference[i]) for i in nn_which), default=0)  # examples in the check batches
    if min_nn_agreement is not None and rows < 3:  # nn_agreement is NaN: every candidate would fail, late and unexplained
        raise ValueError(f"min_nn_agreement needs at least 3 rows (examples) in the check batches to find nearest neighbours, got "
                         f"{rows}: pass more check batches (>= {NN_MIN_ROWS} rows give a figure)")
    result_notes: list[str] = []
    if scores:
        result_notes.append(f"no nearest-neighbour agreement on {', '.join(scores)}: classifier scores (nn_outputs names outputs to measure)")
        log.info(result_notes[-1])
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
    if keep_float:
        result_notes.append(f"kept float as asked: {', '.join(keep_float)}")
    reduce_range = needs_reduced_range()
    flavours = FLAVOURS if flavour == "auto" else (flavour,)
    candidates: list[Int8Candidate] = []

    def measure(label: str, q: onnx.ModelProto, n_linears: int) -> Int8Candidate:  # time, check, log, keep
        sess = _session(q, threads)
        got = _outputs(sess, check)
        cand = Int8Candidate(label, q, _count_quantized(q), n_linears, _latency_ms(sess, check, repeats), _worst_cosine(reference, got), _worst_nn_agreement(reference, got, nn_which))
        cand.accepted = cand.cosine >= min_cosine and (min_nn_agreement is None or cand.nn_agreement >= min_nn_agreement)
        log.info("int8 %s graph: %d/%d Linears int8, %.2f ms, cosine %.5f, NN agreement %.3f", label, cand.quantized, cand.linears, cand.latency_ms, cand.cosine, cand.nn_agreement)
        candidates.append(cand)
        return cand

    for name, src in sources.items():
        linears = linear_matmuls(src)
        writable = set(_writable(src))
        skipped = [n for n in linears if n not in writable]
        if skipped:
            result_notes.append(f"{name}: {len(skipped)} Linears are not MatMuls with a 2-D constant weight and stay float: {', '.join(skipped[:5])}")
            log.warning(result_notes[-1])
        gelu = set(after_gelu(src))
        chosen = [n for n in linears if n in writable and n not in keep_float]
        groups = linear_inputs(src, chosen)
        stats = collect_stats(src, calibration, list(groups), threads)
        if smooth_alpha is not None:
            src, stats = smooth(src, groups, stats, smooth_alpha)
        plans = {True: [True], False: [False], "auto": [False, True]}[float_after_gelu]
        for keep_gelu in plans:
            nodes = [n for n in chosen if not (keep_gelu and n in gelu)]
            node_groups = linear_inputs(src, nodes)
            missed = True
            for fl in flavours:
                label = f"{name}/{fl}" + ("+float-ffn2" if keep_gelu else "")
                q = quantize_linears(src, node_groups, stats, flavour=fl, reduce_range=reduce_range)
                if attention_int8 is True:
                    if "context" in attention_matmuls(q).values():
                        q, label = quantize_attention_matmuls(q, ("context",)), f"{label}+context-int8"
                    else:
                        result_notes.append(f"{label}: attention_int8=True, but no attention context MatMul is recognised in the graph "
                                            "(a fused Attention op, or a pattern hf.linear_int8.attention_matmuls does not know): its attention stays float")
                        log.warning(result_notes[-1])
                cand = measure(label, q, len(linears))
                missed = missed and not cand.accepted
            if not missed:
                break
            if float_after_gelu == "auto" and not keep_gelu and gelu:
                result_notes.append(
                    f"{name}: with every Linear in int8 no flavour reaches cosine {min_cosine}"
                    + (f" and NN agreement {min_nn_agreement}" if min_nn_agreement is not None else "")
                    + f"; trying the {len(gelu)} Linears after GELU in float"
                )
                log.warning(result_notes[-1])
    ok = [c for c in candidates if c.accepted]
    if attention_int8 == "auto" and ok:
        first = min(ok, key=lambda c: c.latency_ms)
        if "context" in attention_matmuls(first.model).values():
            measure(f"{first.name}+context-int8", quantize_attention_matmuls(first.model, ("context",)), first.linears)
            ok = [c for c in candidates if c.accepted]
        else:
            result_notes.append(f"attention_int8='auto': no int8-attention candidate, the fastest accepted graph ({first.name}) "
                                "has no attention context MatMul that hf.linear_int8.attention_matmuls recognises")
            log.info(result_notes[-1])
    fp32_ms = _latency_ms(fp32, check, repeats)
    if not ok:
        shown = "; ".join(f"{c.name}: cosine {c.cosine:.4f}, NN agreement {c.nn_agreement:.3f}" for c in candidates)
        bound = f"cosine >= {min_cosine}" + (f" and NN agreement >= {min_nn_agreement}" if min_nn_agreement is not None else "")
        raise Int8Error(f"no int8 graph keeps {bound} to fp32 ({shown}); calibrate on more representative text")
    best = min(ok, key=lambda c: c.latency_ms)
    if best.quantized < best.linears:
        result_notes.append(f"{best.name}: {best.linears - best.quantized} of {best.linears} Linears stay float")
    result_notes.append(f"kept the {best.name} graph: {best.latency_ms:.2f} ms vs fp32 {fp32_ms:.2f} ms, cosine {best.cosine:.5f}, NN agreement {best.nn_agreement:.3f}")
    if min_nn_agreement is None and best.nn_agreement < NN_AGREEMENT_WARN and rows < NN_MIN_ROWS:  # NaN compares False
        result_notes.append(f"{best.name}: NN agreement {best.nn_agreement:.1%} on {rows} check rows, too few to judge retrieval (>= {NN_MIN_ROWS} give a figure)")
        log.info(result_notes[-1])
    elif min_nn_agreement is None and best.nn_agreement < NN_AGREEMENT_WARN:
        better = [c for c in ok if c.nn_agreement >= NN_AGREEMENT_WARN]
        msg = (f"the kept int8 graph {best.name} keeps cosine {best.cosine:.4f} but only {best.nn_agreement:.1%} of the check rows keep their "
               f"nearest neighbour (< {NN_AGREEMENT_WARN:.0%})"
               + (f"; {', '.join(c.name for c in better)} would keep >= {NN_AGREEMENT_WARN:.0%}" if better else "")
               + f"; pass min_nn_agreement={NN_AGREEMENT_WARN} to require it")
        result_notes.append(msg)
        warnings.warn(msg, RetrievalAgreementWarning, stacklevel=2)
    return Int8Result(best.model, best.name, candidates, fp32_ms, result_notes)

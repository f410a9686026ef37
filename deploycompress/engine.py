"""``build_engine``: masks -> speedup -> export -> QDQ -> build -> validate -> bundle, in one call.

Calibration and speedup: the calibration that reaches the graph must describe the model that is
exported, i.e. the speeded-up one. Module names survive speedup, but pruned layers lose channels,
so per-channel weight parameters taken on the masked model no longer fit. Two ways are supported:

* ``calib_data`` given: the speeded-up model is calibrated here with ``PTQQuantizer`` (recommended:
  activation ranges are then observed on exactly the deployed network);
* ``calib_config`` given with ``masks``: activation parameters are kept (the kept channels carry the
  same values as in the masked model, the pruned ones were zero), and the per-channel weight parameters
  of every layer whose channel count changed are re-derived from the speeded-up weights with the same
  bits, dtype and scheme (weights are known exactly, no data is needed). Per-channel activation
  parameters on a resized layer cannot be re-derived without data: that is an error asking for
  ``calib_data``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from calibrators import params_from_range

from .bundle import BundleError, Manifest, check_out_dir, collect_environment, load_bundle, write_bundle
from .bundle.triton import check_model_name
from .checks import check_backend_options, check_batches, check_count, check_eval_data, check_example_inputs, check_masks_usable
from .errors import InputError, StepError
from .model_copy import plain_copy
from .quantization.calib_config import CalibConfig, CalibConfigError
from .quantization.quantizer import LEFT_FLOAT_KEY
from .report import AccuracyRecord, FidelityRecord, LatencyRecord, Report, SizeRecord

__all__ = ["BuildStepError", "EngineArtifact", "EngineError", "QDQLintWarning", "build_engine", "qdq_summary", "DEFAULT_QUANT_CONFIG", "default_quant_config"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
#: TensorRT also builds fp16 engines (from the fp16 graph)
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")

#: inputs and weights (PTQQuantizer: per-channel) of every Conv and Linear (subclasses included), 8 bits:
#: the layers int8 kernels exist for
DEFAULT_QUANT_CONFIG: list[dict[str, Any]] = [
    {"op_types": ["Conv1d", "Conv2d", "Conv3d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8}
]
#: layers whose outputs are also calibrated by default: a quantized output after a conv's
#: activation or pool is what lets onnxruntime fuse the conv into QLinearConv and run pools in int8
#: (without it the last conv before a global pool stays float)
DEFAULT_OUTPUT_OP_TYPES = ("BatchNorm1d", "BatchNorm2d", "ReLU", "ReLU6", "MaxPool2d", "AdaptiveAvgPool2d")
CONV_OP_TYPES = ("Conv1d", "Conv2d", "Conv3d")


def default_quant_config(model: nn.Module, example_inputs: Any = None) -> list[dict[str, Any]]:
    """What ``calib_data`` calibrates when no ``quant_config_list`` is given: DEFAULT_QUANT_CONFIG,
    plus the outputs of the model's activations and pools (only types the model has, so the
    config never selects nothing).

    With ``example_inputs`` the outputs are chosen on one traced forward so that the simulation
    quantizes the tensors the deployed graph quantizes: a conv's output is calibrated too (what lets
    onnxruntime run it as QLinearConv when a float op reads it: a sigmoid gate, a residual Add, a graph
    output), except where a BatchNorm or ReLU module reads it (the graph folds the BatchNorm into the
    conv and the ReLU into the following Q, so only the last of such a chain is quantized).
    """
    present = {_kind(m, DEFAULT_OUTPUT_OP_TYPES) for m in model.modules()}
    if example_inputs is None:
        outputs = [t for t in DEFAULT_OUTPUT_OP_TYPES if t in present]
        extra = [{"op_types": outputs, "quant_types": ["output"], "quant_bits": 8}] if outputs else []
        return [dict(c) for c in DEFAULT_QUANT_CONFIG] + extra
    ends = _chain_ends(model, example_inputs)
    config = [dict(c) for c in DEFAULT_QUANT_CONFIG]
    convs = [n for n, t in ends.items() if t in CONV_OP_TYPES]
    others = [n for n, t in ends.items() if t not in CONV_OP_TYPES]
    if convs:
        config.append({"op_names": convs, "quant_types": ["input", "weight", "output"], "quant_bits": 8})
    if others:
        config.append({"op_names": others, "quant_types": ["output"], "quant_bits": 8})
    return config


def _chain_ends(model: nn.Module, example_inputs: Any) -> dict[str, str]:
    """Modules (convs, BatchNorms, activations, pools) whose output no BatchNorm/ReLU module reads."""
    from .tensor_io import name_inputs

    candidates = set(CONV_OP_TYPES) | set(DEFAULT_OUTPUT_OP_TYPES)
    absorbers = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU", "ReLU6"}
    # (tensor id, its version counter when produced): an in-place op on a module's output (a residual
    # ``out += identity``) keeps the id but bumps the version, so the ReLU after the sum reads another value
    produced: dict[tuple[int, int], str] = {}
    absorbed: set[str] = set()
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the forward runs
    handles = []
    def produce(name: str):
        def hook(mod, inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                keep_alive.append(output)
                produced[(id(output), output._version)] = name

        return hook

    def absorb(mod, inputs) -> None:
        key = (id(inputs[0]), inputs[0]._version) if inputs and isinstance(inputs[0], torch.Tensor) else None
        if key in produced:
            absorbed.add(produced[key])

    for name, mod in model.named_modules():
        kind = _kind(mod, (*CONV_OP_TYPES, *DEFAULT_OUTPUT_OP_TYPES))
        if kind in candidates:
            handles.append(mod.register_forward_hook(produce(name)))
        if _kind(mod, tuple(absorbers)) in absorbers:
            handles.append(mod.register_forward_pre_hook(absorb))
    named = name_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*named.args)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    return {n: _kind(modules[n], tuple(candidates)) for n in dict.fromkeys(produced.values()) if n not in absorbed}


def _kind(module: nn.Module, op_types: Sequence[str]) -> str | None:
    """The first of the torch.nn ``op_types`` that ``module`` is an instance of (subclasses included)."""
    return next((t for t in op_types if isinstance(module, getattr(nn, t))), None)


class QDQLintWarning(UserWarning):
    """The int8 graph breaks its target's QDQ rules, or leaves weighted ops in float."""


def qdq_summary(qdq_model: Any, target: str) -> dict[str, Any]:
    """Lint ``qdq_model`` for ``target`` and count its weighted ops in int8 and in float (by the lint's
    account: weight and input dequantized, output reaching a QuantizeLinear where the target needs it);
    warns with :class:`QDQLintWarning` when something is found."""
    import warnings

    from .export import get_target, lint_qdq, skipped_calibration
    import onnx_graphsurgeon as gs

    from .export.graph_utils import has_weight, is_gemv

    try:
        spec = get_target(target)
    except ValueError:
        return {"target": target, "lint": [], "skipped_calibration": skipped_calibration(qdq_model)}
    findings = lint_qdq(qdq_model, target)
    weighted = [n for n in gs.import_onnx(qdq_model).nodes if has_weight(n)]
    broken = {f.node for f in findings if f.rule in ("input-unquantized", "float-output", "weight-unquantized")}
    int8 = [n.name for n in weighted if n.name not in broken and n.inputs[1].inputs and n.inputs[1].inputs[0].op == "DequantizeLinear"]
    # float by the target's own rule (TensorRT: the classifier GEMV), said by insert_qdq's warning already
    by_design = [n.name for n in weighted if n.name not in int8 and spec.float_gemv and is_gemv(n)]
    summary = {
        "target": target,
        "lint": [f.to_dict() for f in findings],
        "int8_weighted_ops": len(int8),
        "float_weighted_ops": len(weighted) - len(int8),
        "float_weighted_nodes": [n.name for n in weighted if n.name not in int8],
        "float_by_target_rule": by_design,
        "skipped_calibration": skipped_calibration(qdq_model),
    }
    if findings or summary["float_weighted_ops"] > len(by_design):
        rules = sorted({f.rule for f in findings})
        warnings.warn(
            f"the int8 graph for {target} has {len(findings)} lint finding(s) {rules} and leaves "
            f"{summary['float_weighted_ops']} weighted op(s) in float {summary['float_weighted_nodes'][:6]}; see report.qdq",
            QDQLintWarning,
            stacklevel=3,
        )
    return summary


class EngineError(InputError, ValueError):
    """An engine build that cannot start: the message names the argument that is wrong."""


class BuildStepError(StepError, RuntimeError):
    """A build step failed on valid arguments: the message names the step and the cause."""


@dataclass
class EngineArtifact:
    """What ``build_engine`` wrote: the bundle directory, its manifest, the report and the validation."""

    out_dir: Path
    manifest: Manifest
    report: Report
    validation: Any = None  # validate.ValidationResult of the deployed model
    calib_config: CalibConfig | None = None
    model: nn.Module | None = None  # the deployed PyTorch model (speeded up), the reference of the validation

    @property
    def artifact_path(self) -> Path:
        return self.out_dir / self.manifest.artifact

    @property
    def report_html(self) -> Path:
        return self.out_dir / "report.html"

    @property
    def report_json(self) -> Path:
        return self.out_dir / "report.json"

    def load(self, **options):
        """The bundle's Runner, after verifying its checksums."""
        return load_bundle(self.out_dir, **options)


@dataclass
class _Steps:
    """Times each build step for the report and drives the progress bar."""

    seconds: dict[str, float] = field(default_factory=dict)
    bar: Any = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description(name)
        log.info("build step: %s", name)
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            if isinstance(exc, (EngineError, BundleError, BuildStepError)):
                raise
            if isinstance(exc, InputError):
                raise EngineError(f"step {name!r}: {exc}") from exc
            raise BuildStepError(f"step {name!r} failed: {type(exc).__name__}: {exc}") from exc
        self.seconds[name] = round(time.perf_counter() - start, 4)
        if self.bar is not None:
            self.bar.update(1)


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; return the folders it created, deepest first (removed again on failure)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return missing


def _named(model: nn.Module, inputs: Any, what: str):
    """``inputs`` (tensor, tuple or dict) resolved against the model's forward parameters."""
    from .tensor_io import InputNamingError, name_inputs

    try:
        return name_inputs(model, inputs)
    except InputNamingError as exc:
        raise EngineError(f"{what}: {exc}") from None


def _first_batch(data: Iterable | None) -> Any:
    """The first item of re-iterable calibration data (None for a one-shot iterator or no data)."""
    if data is None or iter(data) is data:  # type: ignore[arg-type]
        return None
    return next(iter(data), None)  # type: ignore[arg-type]


ATTACHMENT_FOLDERS = ("attachments", "pruning")


def _check_attachments(attachments: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, Path]:
    """Bundle-relative path -> existing file; refused before any work when a path leaves the
    attachment folders or a file is missing."""
    out: dict[str, Path] = {}
    for rel, src in (attachments or {}).items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or len(parts) < 2 or parts[0] not in ATTACHMENT_FOLDERS or ".." in parts:
            raise EngineError(f"attachments: {rel!r} must be a relative path under one of {list(ATTACHMENT_FOLDERS)}/")
        if not Path(src).is_file():
            raise EngineError(f"attachments: {str(src)!r} (for {rel!r}) is not a file")
        out[Path(rel).as_posix()] = Path(src)
    return out


def _check_calibration(calib: CalibConfig, model: nn.Module) -> None:
    """Before any work: the calibration names modules the model has, its per-channel weight lengths and
    axes fit, and its bit widths are ones int8 QDQ can express."""
    try:
        calib.validate(model)
    except CalibConfigError as exc:
        raise EngineError(f"calib_config does not fit the model: {exc}") from None
    odd = [f"{m}.{k} ({p.bits} bits)" for m, k, p in calib.items() if p.bits != 8]
    if odd:
        raise EngineError(f"calib_config: int8 engines take 8-bit weights and activations only; change {odd}")


def _load_masks(masks: Any, model: nn.Module):
    from .pruning import load_masks
    from .pruning.io import check_masks

    if masks is None:
        return None
    try:
        if isinstance(masks, (str, os.PathLike)):
            masks = load_masks(masks)
        return check_masks(masks, model)
    except (ValueError, OSError, RuntimeError) as exc:
        raise EngineError(f"masks: {exc}") from exc


def _load_calib(calib_config: Any, model: nn.Module | None = None) -> CalibConfig | None:
    if calib_config is None or isinstance(calib_config, CalibConfig):
        return calib_config
    if isinstance(calib_config, (str, os.PathLike)):
        try:
            return CalibConfig.load(calib_config, model=model)  # model: LSQ 2.x weights NNI did not export
        except CalibConfigError as exc:
            raise EngineError(str(exc)) from exc
    raise EngineError(f"calib_config must be a CalibConfig or a path to its JSON, got {type(calib_config).__name__}")


def _linear_like_calibration(calib: CalibConfig, names: Sequence[str]) -> CalibConfig:
    """A calibration taken on linear-like layers (weight ``(in, out)``, per-channel on axis 1) made to fit their
    lowered ``nn.Linear`` (``(out, in)``: the same scales on axis 0)."""
    import dataclasses

    lowered = set(names)
    out = CalibConfig(producer=calib.producer, provenance=dict(calib.provenance))
    for name, kind, p in calib.items():
        if name in lowered and kind == "weight" and p.axis is not None:
            p = dataclasses.replace(p, axis=0)
        out.set(name, kind, p)
    return out


def fit_calibration(calib: CalibConfig, model: nn.Module) -> CalibConfig:
    """Make a calibration taken on the masked model fit the speeded-up one (see the module docstring)."""
    modules = dict(model.named_modules())
    missing = sorted(m for m in calib.modules if m not in modules)
    if missing:
        raise EngineError(f"the calibration names module(s) the speeded-up model lacks: {missing}")
    out = CalibConfig(producer=calib.producer, provenance=dict(calib.provenance))
    for name, kind, p in calib.items():
        module = modules[name]
        weight = getattr(module, "weight", None)
        if kind == "weight" and p.axis is not None and isinstance(weight, torch.Tensor):
            w = weight.detach().float().cpu().numpy()
            if w.shape[p.axis] != np.atleast_1d(p.scale).size:
                flat = np.moveaxis(w, p.axis, 0).reshape(w.shape[p.axis], -1)
                p = params_from_range(flat.min(1), flat.max(1), bits=p.bits, signed=p.signed, symmetric=p.symmetric, axis=p.axis)
                log.info("re-derived the %d per-channel weight scales of %s after speedup", flat.shape[0], name)
        elif kind != "weight" and p.axis is not None:
            raise EngineError(
                f"calibration of {name}.{kind} is per-channel and the layer was resized by speedup; "
                "pass calib_data so the speeded-up model is calibrated"
            )
        out.set(name, kind, p)
    return out


def _calibrate(
    model: nn.Module, calib_data: Iterable, config_list: list[dict], calibrator: str, *, progress: bool = True,
    bias_correction: bool = False,
) -> tuple[CalibConfig, dict[str, torch.Tensor]]:
    """The calibration of ``model`` on ``calib_data`` and, with ``bias_correction``, the corrected biases of its
    quantized layers (:mod:`deploycompress.quantization.bias_correction`; empty otherwise)."""
    from .quantization import PTQQuantizer

    sim = copy.deepcopy(model).eval()
    quantizer = PTQQuantizer(sim, config_list, calibrator=calibrator)
    batches = list(calib_data)
    quantizer.calibrate(batches, progress=progress)
    biases = quantizer.correct_bias(batches, progress=progress).biases(quantizer) if bias_correction else {}
    return quantizer.export_calib_config(), biases


def _set_biases(model: nn.Module, biases: Mapping[str, torch.Tensor]) -> None:
    """Give ``model``'s layers the corrected biases (a layer without a bias gets one)."""
    for name, bias in biases.items():
        module = model.get_submodule(name)
        module.bias = nn.Parameter(bias.detach().clone().to(module.weight.dtype), requires_grad=False)


def _size_record(stage: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> SizeRecord:
    from .counting import count_flops_params

    counted = count_flops_params(model, inputs)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return SizeRecord(stage=stage, params=int(counted.params), flops=int(counted.flops), size_bytes=int(size))


def _records_from_validation(result: Any, backend: str, precision: str, reference_label: str) -> tuple[list, list, list]:
    """Turn a ValidationResult into the report's latency, accuracy and fidelity records."""
    label = f"{backend} {precision}"
    latency = [LatencyRecord.from_stats(stats, backend, precision) for stats in result.latency]
    accuracy = []
    if result.metric is not None:
        m = result.metric
        accuracy.append(AccuracyRecord(label, m.name, float(m.value), reference_label, float(m.reference_value)))
    outputs = result.outputs or {"": result.accuracy}
    fidelity = [
        FidelityRecord(label, reference_label, float(a.max_abs_error), float(a.cosine_similarity), a.top1_agreement,
                       output=name if len(outputs) > 1 else "")
        for name, a in outputs.items()
    ]
    return latency, accuracy, fidelity


def _check_quant_bits(config_list: Sequence[Mapping[str, Any]]) -> None:
    """The graph holds 8-bit Q/DQ only: other widths in ``quant_config_list`` are refused before calibrating."""
    for i, cfg in enumerate(config_list):
        if not isinstance(cfg, Mapping):
            continue
        bits = cfg.get("quant_bits")
        values = bits.values() if isinstance(bits, Mapping) else [] if bits is None else [bits]
        digits = "".join(c for c in str(cfg.get("quant_dtype", "")) if c.isdigit())  # NNI 3.0: "int4", "uint8"
        odd = [b for b in list(values) + ([int(digits)] if digits else []) if b != 8]
        if odd:
            raise EngineError(f"quant_config_list[{i}] asks for {odd[0]}-bit quantization, but the int8 graph holds 8-bit "
                              "Q/DQ only: give quant_bits 8 (other widths: simulate them with the quantizers, "
                              "deploycompress.quantization, and export their CalibConfig for another runtime)")


def build_engine(
    model: nn.Module,
    masks: Any = None,
    calib_config: CalibConfig | str | os.PathLike[str] | None = None,
    *,
    example_inputs: Any,
    backend: str = "onnxruntime",
    precision: str = "int8",
    out_dir: str | os.PathLike[str],
    calib_data: Iterable | None = None,
    quant_config_list: list[dict] | None = None,
    calibrator: str = "minmax",
    bias_correction: bool = False,
    eval_inputs: Any = None,
    eval_labels: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = (1,),
    iterations: int = 100,
    warmup: int = 10,
    compare_fp32: bool = True,
    name: str | None = None,
    round_to: int = 1,
    norm_spans: str = "keep",
    max_batch_size: int = 32,
    overwrite: bool = False,
    backend_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    export_tolerance: float = 1e-3,
    strict: bool = False,
    attachments: Mapping[str, str | os.PathLike[str]] | None = None,
) -> EngineArtifact:
    """Build a serving bundle in ``out_dir`` (written atomically: nothing is left there on failure).

    ``masks`` (dict or path) and ``calib_config`` (CalibConfig or path) may be None to skip pruning
    or to let ``calib_data`` (an iterable of input batches) calibrate the speeded-up model. ``eval_inputs``
    (and ``eval_labels``) are what the deployed model is validated on; by default ``example_inputs``.
    ``round_to`` and ``norm_spans`` go to :func:`deploycompress.speedup.speedup`.

    ``example_inputs`` (and ``eval_inputs``, ``calib_data`` items) may be a tensor, a tuple or a dict of
    tensors keyed by forward's parameter names; graph inputs and outputs are named as
    :mod:`deploycompress.tensor_io` describes. ``dynamic_axes`` adds dynamic axes per input beyond the
    batch (``{"ids": {1: "sequence"}}``). The exported graph is run against PyTorch on the example
    inputs and on a second input (first calibration batch, else the evaluation inputs); a relative
    difference above ``export_tolerance`` on any output is a :class:`BuildStepError` naming it. The
    int8 graph is linted for the backend's QDQ target; findings, the weighted ops left in float and the
    calibration entries skipped (modules absent from the graph) go into ``report.qdq`` and a
    :class:`QDQLintWarning`.
    With ``compare_fp32`` an int8 build also builds and measures the fp32 graph on the same backend, so
    the report shows what int8 gains and costs.

    Layer subclasses (padded convs, weight-standardised convs, ...) are checked against their base on
    ``example_inputs`` (:mod:`deploycompress.subclasses`): followed, baked, or refused by name before any
    work. After QDQ insertion and after the backend's optimisation, the weighted layers that run in int8
    are counted (:mod:`deploycompress.precision_audit`, recorded in ``report.quantized_layers``); fewer than
    the calibration selected gives a ``PrecisionShortfallWarning`` naming the layers, or with ``strict=True``
    a ``PrecisionShortfallError``.

    ``attachments`` maps a relative path under ``attachments/`` or ``pruning/`` inside the bundle to a
    file copied there and listed (with its sha256) in the manifest, e.g. a pruning search's report.
    """
    from tqdm.auto import tqdm

    from .backends import get_backend
    from .export import insert_qdq, to_onnx
    from .validate import check_export, validate
    from .graph.trace import check_norm_spans
    from .precision_audit import INTEGER_KERNELS, audit_optimized, audit_qdq, check_precision

    # -- everything that can be checked is checked before any long work ----------------------------
    try:
        out_dir = check_out_dir(out_dir, overwrite=overwrite)
    except BundleError as exc:
        raise EngineError(str(exc)) from exc
    allowed = TENSORRT_PRECISIONS if backend == "tensorrt" else PRECISIONS
    if precision not in allowed:
        raise EngineError(f"precision must be one of {list(allowed)} for backend {backend!r}, got {precision!r}")
    if not isinstance(model, nn.Module):
        raise EngineError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .quantization.wrapper import QuantWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, QuantWrapper)]
    if wrapped:
        raise EngineError(f"model still holds quantizer wrappers ({', '.join(wrapped[:3])}{', ...' if len(wrapped) > 3 else ''}): "
                          "pass quantizer.unwrap_model() as the model and quantizer.export_calib_config() as calib_config")
    name = name if name is not None else type(model).__name__.lower()
    try:
        check_model_name(name)
        for value, label, low in ((iterations, "iterations", 1), (warmup, "warmup", 0), (max_batch_size, "max_batch_size", 0),
                                  (round_to, "round_to", 1)):
            check_count(value, label, low)
        for b in batch_sizes:
            check_count(b, f"batch_sizes {list(batch_sizes)}", 1)
    except InputError as exc:
        raise EngineError(str(exc)) from exc
    attached = _check_attachments(attachments)
    named = _named(model, example_inputs, "example_inputs")
    inputs = named.args
    try:
        engine_backend = get_backend(backend)
        check_backend_options(engine_backend, dict(backend_options or {}))
    except Exception as exc:
        raise EngineError(f"backend: {exc}") from exc
    try:
        check_norm_spans(norm_spans)
    except ValueError as exc:
        raise EngineError(str(exc)) from exc
    trt_options, trt_extra, trt_portable = None, {}, False
    if backend == "tensorrt":
        from .backends.tensorrt import tensorrt_available
        from .engine_tensorrt import split_options

        try:
            trt_options, trt_extra = split_options(backend_options)
        except ValueError as exc:
            raise EngineError(f"backend_options: {exc}") from exc
        trt_portable = bool(trt_extra.get("portable")) or not tensorrt_available()
    masks = _load_masks(masks, model)
    if masks is not None:
        check_masks_usable(masks)
    check_example_inputs(model, inputs)  # runs once: shape/dtype errors named as the argument
    from .linear_like import lower_linear_like, transpose_masks
    from .subclasses import SubclassError, analyse_layers, lower_layers

    try:
        layer_forms = analyse_layers(model, inputs)
    except SubclassError as exc:
        raise EngineError(str(exc)) from exc
    calib = _load_calib(calib_config, model)
    if calib is not None and precision == "int8":
        _check_calibration(calib, model)
    if calib is None and precision == "int8" and quant_config_list:
        _check_quant_bits(quant_config_list)
    if bias_correction and backend == "tensorrt":
        # the correction is measured in the PTQ simulation, whose placement is onnxruntime's; the TensorRT target
        # places Q/DQ otherwise (its classifier GEMV stays float), and the shifts then hurt: measured on the
        # pretrained EfficientNet-Lite0, cosine to fp32 0.988 -> 0.746 (max) and 0.988 -> 0.986 (entropy)
        raise EngineError("bias_correction=True is measured for the onnxruntime target's placement only: build the "
                          "tensorrt backend without it (bias_correction=False, CLI: drop --bias-correction)")
    if bias_correction and (precision != "int8" or calib_data is None):
        raise EngineError("bias_correction=True corrects the int8 biases on calib_data: pass precision='int8' and calib_data "
                          "(a given calib_config carries no data to correct on)")
    if precision == "int8" and calib is None and calib_data is None:
        raise EngineError("precision 'int8' needs a calibration: pass calib_config (CalibConfig or JSON path) or calib_data (input batches)")
    if precision in ("fp32", "fp16") and (calib is not None or calib_data is not None):
        log.warning("precision %r: the calibration is ignored", precision)
        calib, calib_data = None, None
    if calib_data is not None:
        calib_data = check_batches(calib_data, named.tensors(), "calib_data", dynamic_axes)  # every batch, before any work
    check_eval_data(eval_inputs, eval_labels, named.tensors(), dynamic_axes=dynamic_axes)
    eval_x = _named(model, eval_inputs, "eval_inputs").tensors() if eval_inputs is not None else named.tensors()
    second = _first_batch(calib_data)
    second_x = _named(model, second, "calib_data batch").tensors() if second is not None else eval_x

    n_steps = 5 + (masks is not None) + (precision == "int8") * 2 + (precision == "int8" and compare_fp32)
    steps = _Steps(bar=tqdm(total=n_steps, desc="build", unit="step", disable=not progress, leave=False))
    report = Report(name=name, backend=backend, precision=precision)
    work_parent = Path(out_dir).absolute().parent
    created = _make_parents(work_parent)
    try:
        with tempfile.TemporaryDirectory(dir=work_parent, prefix=f".{Path(out_dir).name}.work.") as tmp:
            work = Path(tmp)
            deployed = plain_copy(model)
            lowered = lower_layers(deployed, layer_forms)
            if lowered:
                report.notes.append("layer subclasses lowered for export: " + "; ".join(layer_forms[n].describe() for n in lowered))
            linear_like = lower_linear_like(deployed)  # transformers' Conv1D -> the equivalent nn.Linear
            if linear_like:
                report.notes.append(f"{len(linear_like)} linear-like layers (weight stored (in, out)) lowered to nn.Linear: {linear_like[:8]}")
                masks = transpose_masks(masks, model) if masks is not None else None
                calib = _linear_like_calibration(calib, linear_like) if calib is not None else None
            report.sizes.append(_size_record("original", deployed, inputs))
            if masks is not None:
                with steps("speedup"):
                    from .speedup import speedup

                    deployed = speedup(deployed, masks, inputs, round_to=round_to, norm_spans=norm_spans).eval()
                report.sizes.append(_size_record("speeded up", deployed, inputs))
            biases: dict[str, torch.Tensor] = {}
            if precision == "int8":
                with steps("calibrate"):
                    if calib_data is not None:
                        calib, biases = _calibrate(deployed, calib_data, quant_config_list or default_quant_config(deployed, example_inputs),
                                                   calibrator, progress=progress, bias_correction=bias_correction)
                        if biases:
                            report.notes.append(f"bias correction: the biases of {len(biases)} quantized layers corrected on the calibration data")
                    elif masks is not None:
                        calib = fit_calibration(calib, deployed)  # type: ignore[arg-type]
            import onnx

            with steps("export"):
                exported = to_onnx(deployed, example_inputs, dynamic_axes=dynamic_axes)
                fp32_path = work / "model.fp32.onnx"
                exported.save(fp32_path)
                report.notes += [f"export: {w}" for w in exported.tracer_warnings]
            with steps("check export"):
                check_export(fp32_path, deployed, [named.tensors(), second_x], tolerance=export_tolerance)
            graph_path = fp32_path
            if precision == "int8":
                with steps("qdq"):
                    quantized = exported
                    if biases:  # the int8 graph runs the corrected biases; the fp32 graph and validation keep the model's
                        corrected = copy.deepcopy(deployed)
                        _set_biases(corrected, biases)
                        quantized = to_onnx(corrected, example_inputs, dynamic_axes=dynamic_axes)
                    qdq = insert_qdq(quantized.model, calib, quantized.name_map, target=backend)  # type: ignore[arg-type]
                    graph_path = work / "model.qdq.onnx"
                    onnx.save(qdq, str(graph_path))
                    report.qdq = qdq_summary(qdq, backend)
                    audit = audit_qdq(qdq, quantized.name_map, [m for m, kind, _ in calib.items() if kind == "weight"], backend=backend,  # type: ignore[union-attr]
                                      exceptions=calib.provenance.get(LEFT_FLOAT_KEY))  # type: ignore[union-attr]
            if backend == "tensorrt":
                import onnx

                from .engine_tensorrt import check_before_build, write_portable

                with steps("tensorrt checks"):
                    if precision == "fp16":
                        from .export.fp16 import to_fp16

                        graph_path = work / "model.fp16.onnx"
                        onnx.save(to_fp16(exported.model), str(graph_path))
                    static = {s.name: list(t.shape) for s, t in zip(exported.inputs, inputs)}
                    trt_check = check_before_build(onnx.load(str(graph_path)), precision, trt_options, trt_extra.get("tensorrt_version"),  # type: ignore[arg-type]
                                       static_shapes=static if trt_options.dla_core is not None else None)  # type: ignore[union-attr]
                if trt_portable:
                    if precision == "int8":  # the Q/DQ count check holds for the portable bundle too
                        report.quantized_layers = audit.to_dict()
                        report.notes.append(audit.summary())
                        check_precision(audit, strict=strict)
                    with steps("portable bundle"):
                        golden = [eval_x[s.name] for s in exported.inputs] if all(s.name in eval_x for s in exported.inputs) \
                            else list(eval_x.values())
                        report.steps = dict(steps.seconds)
                        report.environment = collect_environment()
                        manifest = write_portable(
                            out_dir=out_dir, work=work, name=name, precision=precision, deployed=deployed, inputs=inputs,
                            golden_inputs=golden, exported=exported, fp32_path=fp32_path,
                            qdq_path=graph_path if precision == "int8" else None, options=trt_options, extra_options=trt_extra,  # type: ignore[arg-type]
                            max_batch_size=max_batch_size, calibration=calib, report=report, overwrite=overwrite,
                            findings=trt_check.findings, attachments=attached,
                            extra={"round_to": round_to, "norm_spans": norm_spans, "pruned": masks is not None})
                    return EngineArtifact(Path(out_dir), manifest, report, validation=None, calib_config=calib, model=deployed)
            build_options = dict(backend_options or {})
            if backend == "tensorrt":
                build_options = {**trt_options.to_dict(), "max_batch_size": max_batch_size,  # type: ignore[union-attr]
                                 "example_shapes": {s.name: list(t.shape) for s, t in zip(exported.inputs, inputs)}}
            with steps("build"):
                artifact = engine_backend.build(graph_path, work / "build", precision=precision, **build_options)
                runner = engine_backend.load(artifact)
                if precision == "int8" and backend in INTEGER_KERNELS:
                    audit_optimized(audit, qdq, onnx.load(str(artifact)), quantized.name_map)
            if precision == "int8":
                report.quantized_layers = audit.to_dict()
                report.notes.append(audit.summary())
                if audit.short:
                    report.notes.append(f"not in int8: {audit.short}")
                check_precision(audit, strict=strict)  # a warning naming the layers, or with strict an error
            with steps("validate"):
                result = validate(runner, deployed, eval_x, labels=eval_labels, metric_name="top1", batch_sizes=batch_sizes,
                                  iterations=iterations, warmup=warmup)
                latency, accuracy, fidelity = _records_from_validation(result, backend, precision, "pytorch fp32")
            if precision == "int8" and compare_fp32:
                with steps("fp32 baseline"):
                    base_art = engine_backend.build(fp32_path, work / "build_fp32", precision="fp32", **build_options)
                    base = validate(engine_backend.load(base_art), deployed, eval_x, labels=eval_labels, metric_name="top1",
                                    batch_sizes=batch_sizes, iterations=iterations, warmup=warmup)
                    base_latency, base_accuracy, base_fidelity = _records_from_validation(base, backend, "fp32", "pytorch fp32")
                    latency = base_latency + latency
                    accuracy = base_accuracy + accuracy
                    fidelity = base_fidelity + fidelity
            report.latency, report.accuracy, report.fidelity = latency, accuracy, fidelity
            with steps("profile"):
                feeds = {k: np.ascontiguousarray(v[:1].detach().cpu().numpy()) for k, v in eval_x.items()}
                report.set_layers(runner.profile(feeds, iterations=max(5, iterations // 5)))
            report.sizes.append(SizeRecord(stage=f"deployed ({precision})", params=report.sizes[-1].params,
                                           flops=report.sizes[-1].flops, size_bytes=Path(artifact).stat().st_size))
            report.steps = dict(steps.seconds)
            report.environment = collect_environment()
            extra_files = {"source/model.fp32.onnx": fp32_path, **attached}
            if graph_path != fp32_path:
                extra_files["source/model.qdq.onnx"] = graph_path
            manifest = write_bundle(
                out_dir,
                name=name,
                backend=backend,
                artifact=artifact,
                precision=precision,
                inputs=runner.inputs,
                outputs=runner.outputs,
                calibration=calib,
                report=report,
                extra_files=extra_files,
                max_batch_size=max_batch_size,
                overwrite=overwrite,
                extra={"round_to": round_to, "norm_spans": norm_spans, "pruned": masks is not None, "steps": report.steps},
            )
    except BaseException:
        for folder in created:  # a failed build leaves no folder it made behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        steps.bar.close()
    log.info("engine bundle written to %s", out_dir)
    return EngineArtifact(Path(out_dir), manifest, report, validation=result, calib_config=calib, model=deployed)

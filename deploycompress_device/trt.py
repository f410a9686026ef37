"""TensorRT through its own Python API: parse, build (profiles, timing cache, DLA, compatibility), load,
run and profile. ``tensorrt`` is imported inside the functions, never at module import.

Why the Python API and not Polygraphy's loaders: this module runs on the device from a bundle with only
numpy, onnx and tensorrt (a Jetson image need not carry Polygraphy); every builder setting used here is
type-checked against ``tensorrt-stubs`` (``make typecheck``); and parser errors are read one by one
(node name, operator, description) to name the ONNX node. Polygraphy stays the cross-check on the host
(``polygraphy convert`` lines in the build plan, ``validate.compare``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx

from . import DeviceBuildError
from .files import write_bytes_atomic
from .plan import HARDWARE_COMPATIBILITY, BuildOptions, Profile, network_is_strongly_typed

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["BuildResult", "TrtRunner", "build_engine", "graph_types", "tensorrt_module", "tensorrt_version"]

log = logging.getLogger(__name__)


def tensorrt_module() -> ModuleType:
    """``import tensorrt``, or a DeviceBuildError saying how to get it (type stubs alone do not count)."""
    try:
        import tensorrt
    except ImportError as exc:
        raise DeviceBuildError("TensorRT is not installed here: pip install tensorrt (or use JetPack's python3-libnvinfer)") from exc
    if getattr(tensorrt, "Builder", None) is None:
        raise DeviceBuildError("only TensorRT's type stubs are installed here, not TensorRT itself: "
                               "pip install tensorrt (or use JetPack's python3-libnvinfer)")
    return tensorrt


def tensorrt_version() -> tuple[int, int]:
    from .checks import parse_version

    return parse_version(str(tensorrt_module().__version__))


def graph_types(model: onnx.ModelProto) -> dict[str, bool]:
    """{"qdq": graph has Q/DQ nodes, "fp16": graph carries float16 tensors} - what decides strong typing."""
    fp16 = onnx.TensorProto.FLOAT16
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    has_fp16 = any(i.data_type == fp16 for i in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]
    ) or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in model.graph.node)
    return {"qdq": has_qdq, "fp16": has_fp16}


@dataclass
class BuildResult:
    """A serialized engine and what the builder decided: strong typing, the inspector's layers, the
    layers that fell back from DLA to the GPU, and the builder's warnings."""

    plan: bytes
    strongly_typed: bool
    tensorrt_version: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    dla_fallback: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _logger() -> Any:
    import tensorrt as trt

    class _Collecting(trt.ILogger):
        """Forwards TensorRT's messages to logging and keeps errors and warnings for the error message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: "trt.ILogger.Severity", msg: str) -> None:
            S = trt.ILogger.Severity
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == S.WARNING:
                self.warnings.append(msg)
                log.warning("TensorRT: %s", msg)
            elif severity == S.INFO:
                log.debug("TensorRT: %s", msg)

    return _Collecting()


def _parser_error(parser: "trt.OnnxParser", model: onnx.ModelProto, path: Path) -> DeviceBuildError:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        index = err.node()
        name = err.node_name() or (model.graph.node[index].name if 0 <= index < len(model.graph.node) else "")
        op = err.node_operator() or (model.graph.node[index].op_type if 0 <= index < len(model.graph.node) else "")
        lines.append(f"node {name or '?'!r} ({op or '?'}, #{index}): {err.desc()}")
    return DeviceBuildError(f"the ONNX-TensorRT parser rejected {path.name}:\n  " + "\n  ".join(lines or ["(no error recorded)"]))


def _dims(dims: "trt.Dims") -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def _profile_shapes(network: "trt.INetworkDefinition", profiles: Mapping[str, Profile]) -> dict[str, Profile]:
    """The profile of every network input with a dynamic axis; an error names inputs left without one."""
    needed: dict[str, Profile] = {}
    missing = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = _dims(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        prof = profiles.get(tensor.name)
        if prof is None:
            missing.append(f"{tensor.name} {dims}")
            continue
        bad = [j for j, d in enumerate(dims) if d >= 0 and not (prof.min[j] == prof.opt[j] == prof.max[j] == d)] if len(prof.min) == len(dims) else [-1]
        if bad:
            raise DeviceBuildError(f"profile of input {tensor.name!r} {prof.to_dict()} does not fit its shape {dims}")
        needed[tensor.name] = prof
    if missing:
        raise DeviceBuildError(f"input(s) {missing} have dynamic axes (-1) and no optimization profile: add min/opt/max to the plan")
    return needed


def _dla_fallback_from_inspector(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """Engine layers outside the DLA loadables (the inspector names DLA subgraphs ``{ForeignNode[...]}``
    with a DLA layer type); Q/DQ reformat layers count too, they run on the GPU."""
    out = []
    for rec in layers:
        text = " ".join(str(rec.get(k, "")) for k in ("Name", "LayerType", "TacticName", "Metadata"))
        if "dla" not in text.lower() and "ForeignNode" not in text:
            out.append(str(rec.get("Name", "?")))
    return out


def build_engine(
    onnx_path: str | os.PathLike[str],
    *,
    precision: str,
    profiles: Mapping[str, Profile],
    options: BuildOptions | None = None,
) -> BuildResult:
    """Build a serialized engine from ``onnx_path``.

    Strongly typed (TensorRT 11 always; 10 when the graph carries Q/DQ or fp16 types, see
    :func:`~deploycompress_device.plan.network_is_strongly_typed`), else TensorRT 10's precision flags
    (``int8`` -> INT8 + FP16, ``fp16`` -> FP16). Raises DeviceBuildError naming the ONNX node on a parser
    error, and carrying the builder's errors on a build failure.
    """
    trt_mod = tensorrt_module()
    import tensorrt as trt  # the same module; a plain import so the type checker knows it

    options = options or BuildOptions()
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    types = graph_types(model)
    major = int(str(trt_mod.__version__).split(".")[0])
    if precision == "int8" and not types["qdq"]:
        raise DeviceBuildError(f"precision int8 needs a Q/DQ graph (explicit quantization); {path.name} has no QuantizeLinear/DequantizeLinear")
    if precision == "fp32" and (types["qdq"] or types["fp16"]):
        raise DeviceBuildError(f"{path.name} carries {'Q/DQ nodes' if types['qdq'] else 'fp16 types'}: build it with precision "
                               f"{'int8' if types['qdq'] else 'fp16'}, or give the fp32 graph")
    strongly = network_is_strongly_typed(major, types["qdq"], types["fp16"], options.strongly_typed if major < 11 else None)
    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 10 opts in with STRONGLY_TYPED; 11 types every network strongly and keeps the flag only as a
    # deprecated no-op (python/src/infer/pyCore.cpp, 11.1: "Deprecated: always enabled"), so 11 passes none
    st_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly and major < 11 and st_flag is not None:
        flags |= 1 << int(st_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        raise _parser_error(parser, model, path)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if not strongly:
        if precision in ("int8", "fp16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the Q/DQ scales, no calibrator
    elif precision == "fp16" and not types["fp16"]:
        raise DeviceBuildError(f"{path.name} is fp32 and the network is strongly typed: build the fp16 graph for precision fp16")
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    cache = None
    if options.timing_cache:
        cache_path = Path(options.timing_cache)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if not config.set_timing_cache(cache, False):
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, True)
    dla_fallback: list[str] = []
    if options.dla_core is not None:
        if builder.num_DLA_cores <= int(options.dla_core):
            raise DeviceBuildError(f"dla_core {options.dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
        if options.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        dla_fallback = [network.get_layer(i).name for i in range(network.num_layers) if not config.can_run_on_DLA(network.get_layer(i))]
        if dla_fallback and not options.gpu_fallback:
            raise DeviceBuildError(f"DLA cannot run {len(dla_fallback)} layer(s) and gpu_fallback is off: {dla_fallback[:10]}")
    if options.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY[options.hardware_compatibility][0])
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    shapes = _profile_shapes(network, profiles)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, p in shapes.items():
            profile.set_shape(name, trt.Dims(list(p.min)), trt.Dims(list(p.opt)), trt.Dims(list(p.max)))
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeviceBuildError(f"TensorRT could not build {path.name}:\n  " + "\n  ".join(logger.errors or ["(no error logged)"]))
    plan = bytes(memoryview(serialized))
    if cache is not None and options.timing_cache:
        write_bytes_atomic(Path(options.timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON) or "{}")
    layers = [rec if isinstance(rec, dict) else {"Name": str(rec)} for rec in info.get("Layers", [])]
    if options.dla_core is not None:
        seen = set(dla_fallback)
        dla_fallback += [n for n in _dla_fallback_from_inspector(layers) if n not in seen]
        if dla_fallback:
            log.warning("DLA core %d: %d layer(s) run on the GPU: %s", options.dla_core, len(dla_fallback), dla_fallback[:20])
    log.info("TensorRT %s built %s (%s, %s typed, %d engine layers)", trt_mod.__version__, path.name, precision,
             "strongly" if strongly else "weakly", len(layers))
    return BuildResult(plan, strongly, str(trt_mod.__version__), layers, dla_fallback, list(logger.warnings))


class TrtRunner:
    """A deserialized engine: numpy feeds in, numpy outputs out, per-layer times from an IProfiler.

    ``inputs``/``outputs``: (name, shape with -1 for dynamic axes, numpy dtype name).
    """

    def __init__(self, plan_path: str | os.PathLike[str]) -> None:
        from . import cudart

        tensorrt_module()
        import tensorrt as trt

        self.path = Path(plan_path)
        self._logger = _logger()
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise DeviceBuildError(f"TensorRT could not load {self.path} (built by another TensorRT version or GPU?): "
                                   + "; ".join(self._logger.errors))
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = cudart.Stream()
        self.inputs: list[tuple[str, tuple[int, ...], str]] = []
        self.outputs: list[tuple[str, tuple[int, ...], str]] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            spec = (name, tuple(_dims(engine.get_tensor_shape(name))), np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(spec)
        self._buffers: dict[str, Any] = {}
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON) or "{}")
        self.layers = [rec for rec in info.get("Layers", []) if isinstance(rec, dict)]

    def _buffer(self, name: str, nbytes: int) -> Any:
        from . import cudart

        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            buf = self._buffers[name] = cudart.DeviceBuffer(nbytes)
        return buf

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(self.context, feeds)

    def _run(self, context: "trt.IExecutionContext", feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from . import cudart

        names = [n for n, _, _ in self.inputs]
        if sorted(feeds) != sorted(names):
            raise DeviceBuildError(f"feeds must name the inputs {names}, got {sorted(feeds)}")
        for name, _, dtype in self.inputs:
            arr = np.ascontiguousarray(np.asarray(feeds[name]), dtype=dtype)
            if not context.set_input_shape(name, list(arr.shape)):
                raise DeviceBuildError(f"input {name!r}: shape {arr.shape} is outside the engine's optimization profile")
            buf = self._buffer(name, arr.nbytes)
            cudart.memcpy_htod(buf, arr, self.stream)
            context.set_tensor_address(name, buf.ptr)
        results: dict[str, np.ndarray] = {}
        for name, _, dtype in self.outputs:
            out = np.empty(tuple(_dims(context.get_tensor_shape(name))), dtype=dtype)
            buf = self._buffer(name, out.nbytes)
            context.set_tensor_address(name, buf.ptr)
            results[name] = out
        if not context.execute_async_v3(self.stream.handle):
            raise DeviceBuildError("TensorRT execute_async_v3 failed: " + "; ".join(self._logger.errors[-3:]))
        for name, out in results.items():
            cudart.memcpy_dtoh(out, self._buffers[name], self.stream)
        self.stream.synchronize()
        return results

    def profile(self, feeds: Mapping[str, np.ndarray], iterations: int = 20) -> list[dict[str, Any]]:
        """Mean time per engine layer (ms) over ``iterations`` runs, from an ``IProfiler``; layer type
        from the engine inspector. Slowest first."""
        import tensorrt as trt

        totals: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)

        class _Profiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                totals[layer_name] += float(ms)
                calls[layer_name] += 1

        context = self.engine.create_execution_context()  # its own context: run() stays unprofiled
        self._run(context, feeds)  # warm-up, not profiled
        context.profiler = _Profiler()
        for _ in range(max(1, int(iterations))):
            self._run(context, feeds)
        kinds = {str(r.get("Name")): str(r.get("LayerType", "")) for r in self.layers}
        out = [{"name": n, "op_type": kinds.get(n, ""), "mean_ms": totals[n] / max(1, int(iterations)),
                "calls": max(1, calls[n] // max(1, int(iterations)))} for n in totals]
        return sorted(out, key=lambda r: -r["mean_ms"])

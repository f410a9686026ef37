"""onnxruntime: the embedded default backend. CPU everywhere, CUDA when the build and machine have it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .base import BackendError, BackendInputError, LayerTime, TensorSpec, named_feeds

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "OPTIMIZATION_LEVELS", "PRECISIONS"]

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
PRECISIONS = ("fp32", "int8")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


def _ort():
    import onnxruntime

    return onnxruntime


def _level(name: str):
    ort = _ort()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise BackendInputError(f"onnxruntime: optimization_level must be one of {list(OPTIMIZATION_LEVELS)}, got {name!r}")
    return levels[name]


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine offer it, CPU always."""
    available = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session_options(optimization_level: str, threads: int | None):
    so = _ort().SessionOptions()
    so.graph_optimization_level = _level(optimization_level)
    if threads is not None:
        if threads < 1:
            raise BackendInputError(f"onnxruntime: threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _check_providers(providers: Sequence[str] | None) -> list[str]:
    if providers is None:
        return default_providers()
    available = _ort().get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise BackendInputError(f"onnxruntime: provider(s) {unknown} are not available here; available: {available}")
    return list(providers)


class OnnxRuntimeRunner:
    """A loaded onnxruntime session: numpy in, numpy out, and a per-node profile."""

    backend = "onnxruntime"

    def __init__(self, path: Path, *, optimization_level: str = "all", threads: int | None = None, providers: Sequence[str] | None = None,
                 model_bytes: bytes | None = None) -> None:
        self.path = Path(path)
        #: with ``model_bytes`` every session (also the profiling one) is made from these bytes, never
        #: from the file again: what a bundle verified is what runs
        self.model_bytes = model_bytes
        self.optimization_level = optimization_level
        self.threads = threads
        self.providers = _check_providers(providers)
        self.session = self._session(profile_dir=None)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()]

    def _session(self, profile_dir: str | None):
        so = _session_options(self.optimization_level, self.threads)
        if profile_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "ort_profile")
        try:
            source = self.model_bytes if self.model_bytes is not None else str(self.path)
            return _ort().InferenceSession(source, so, providers=self.providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load {self.path}: {exc}") from exc

    def _feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = named_feeds(feeds, self.inputs, "onnxruntime")
        names = [i.name for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise BackendInputError(f"onnxruntime: feeds must name the inputs {names}; missing {missing}, unknown {extra}")
        return {s.name: np.ascontiguousarray(np.asarray(feeds[s.name]), dtype=s.dtype) for s in self.inputs}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, self._feeds(feeds))
        return {o.name: v for o, v in zip(self.outputs, values)}

    def profile(self, feeds: Mapping[str, np.ndarray], iterations: int = 20) -> list[LayerTime]:
        """Per-node kernel times from onnxruntime's profiler, averaged over ``iterations`` runs."""
        if iterations < 1:
            raise BackendInputError(f"profile: iterations must be >= 1, got {iterations}")
        data = self._feeds(feeds)
        with tempfile.TemporaryDirectory(prefix="dc-ort-profile-") as tmp:
            session = self._session(profile_dir=tmp)
            session.run(None, data)  # warm-up run, dropped below
            for _ in range(iterations):
                session.run(None, data)
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text())
        return layer_times(events, iterations)


def layer_times(events: list[dict], iterations: int) -> list[LayerTime]:
    """Turn onnxruntime's chrome-trace events into one :class:`LayerTime` per node, slowest first.

    The first ``model_run`` of the trace is the warm-up; node events inside it are dropped.
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    start = runs[0]["ts"] + runs[0]["dur"] if len(runs) > iterations else -1
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    info: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) < start:
            continue
        node = e["name"][: -len("_kernel_time")]
        total[node] += float(e.get("dur", 0)) / 1000.0
        calls[node] += 1
        args = e.get("args", {})
        info[node] = {"op_type": args.get("op_name", ""), "provider": args.get("provider", "")}
    out = [
        LayerTime(name=n, op_type=info[n]["op_type"], mean_ms=total[n] / iterations, calls=calls[n] // max(iterations, 1) or 1,
                  extra={"provider": info[n]["provider"]})
        for n in total
    ]
    return sorted(out, key=lambda lt: -lt.mean_ms)


class OnnxRuntimeBackend:
    """Builds ``model.onnx`` optimized by onnxruntime and loads it into a :class:`OnnxRuntimeRunner`.

    The saved graph is optimized at most at the ``extended`` level: the ``all`` level adds layout
    transforms (NCHWc) tied to this CPU, so they are applied again at load time instead.
    """

    name = "onnxruntime"
    artifact_name = "model.onnx"

    def build(
        self,
        onnx_path: Path,
        out_dir: Path,
        *,
        precision: str = "int8",
        optimization_level: str = "all",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        **options,
    ) -> Path:
        if options:
            raise BackendInputError(f"onnxruntime.build: unknown option(s) {sorted(options)}")
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        if precision not in PRECISIONS:
            raise BackendInputError(f"onnxruntime: precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if not onnx_path.is_file():
            raise BackendInputError(f"onnxruntime: ONNX file {str(onnx_path)!r} does not exist")
        _level(optimization_level)
        providers = _check_providers(providers)
        try:
            model = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as exc:
            raise BackendInputError(f"onnxruntime: {str(onnx_path)!r} is not a readable ONNX model: {exc}") from exc
        has_qdq = any(n.op_type in _QDQ_OPS for n in model.graph.node)
        if precision == "int8" and not has_qdq:
            raise BackendInputError(f"onnxruntime: precision 'int8' needs a QDQ graph, {onnx_path.name} has no QuantizeLinear/DequantizeLinear (run insert_qdq first)")
        if precision == "fp32" and has_qdq:
            raise BackendInputError(f"onnxruntime: {onnx_path.name} holds Q/DQ nodes; build it with precision 'int8'")
        saved_level = optimization_level if optimization_level != "all" else "extended"
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / self.artifact_name
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".onnx.tmp")
        os.close(fd)
        try:
            so = _session_options(saved_level, threads)
            so.optimized_model_filepath = tmp
            try:
                _ort().InferenceSession(str(onnx_path), so, providers=[p for p in providers if p == "CPUExecutionProvider"] or providers)
            except Exception as exc:
                raise BackendError(f"onnxruntime could not build {onnx_path}: {exc}") from exc
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("onnxruntime: built %s (%s, saved at level %s)", target, precision, saved_level)
        return target

    def load(self, artifact_path: Path, *, optimization_level: str = "all", threads: int | None = None,
             providers: Sequence[str] | None = None, **options) -> OnnxRuntimeRunner:
        if options:
            raise BackendInputError(f"onnxruntime.load: unknown option(s) {sorted(options)}")
        artifact_path = Path(artifact_path)
        if not artifact_path.is_file():
            raise BackendInputError(f"onnxruntime: artifact {str(artifact_path)!r} does not exist")
        return OnnxRuntimeRunner(artifact_path, optimization_level=optimization_level, threads=threads, providers=providers)

    def load_bytes(self, model_bytes: bytes, *, name: str = "<bytes>", optimization_level: str = "all", threads: int | None = None,
                   providers: Sequence[str] | None = None, **options) -> OnnxRuntimeRunner:
        """Load a model held in memory (``name`` is what messages call it): a verified bundle hands the
        very bytes it hashed, so no file can be swapped between verification and load."""
        if options:
            raise BackendInputError(f"onnxruntime.load: unknown option(s) {sorted(options)}")
        return OnnxRuntimeRunner(Path(name), optimization_level=optimization_level, threads=threads, providers=providers,
                                 model_bytes=bytes(model_bytes))

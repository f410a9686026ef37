"""TensorRT on the backend protocol: ``build`` (ONNX -> ``model.plan``), ``load``, ``Runner.run``/``profile``.

``tensorrt`` is imported lazily, only when an engine is built or loaded. The work itself is done by the
torch-free :mod:`deploycompress_device` package (the same code the device runs from a portable bundle):
see :mod:`deploycompress_device.trt` for why TensorRT's Python API is driven directly rather than
through Polygraphy's loaders. On a machine without TensorRT, ``build_engine(..., backend="tensorrt")``
writes a portable bundle instead of calling :meth:`TensorRTBackend.build`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from deploycompress_device import DeviceBuildError
from deploycompress_device.checks import check_dla, check_operators, errors
from deploycompress_device.plan import BuildOptions, Profile, make_profiles

from .base import BackendError, LayerTime, TensorSpec, named_feeds

__all__ = ["PRECISIONS", "TensorRTBackend", "TensorRTRunner", "tensorrt_available", "tensorrt_version"]

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "fp32")


def tensorrt_available() -> bool:
    """True when the real TensorRT (not only its type stubs) imports here."""
    try:
        import tensorrt
    except ImportError:
        return False
    return getattr(tensorrt, "Builder", None) is not None


def tensorrt_version() -> str | None:
    """'MAJOR.MINOR' of the installed TensorRT, None without it."""
    if not tensorrt_available():
        return None
    from deploycompress_device.trt import tensorrt_version as version

    return "%d.%d" % version()


def _not_installed(step: str) -> BackendError:
    return BackendError(
        f"tensorrt.{step}: TensorRT is not installed here (pip install 'deploycompress[tensorrt]' on a machine with an NVIDIA "
        "GPU, or JetPack on a Jetson). build_engine(..., backend='tensorrt') writes a portable bundle on such a machine; "
        "build it on the device with `python -m deploycompress_device BUNDLE`"
    )


def _spec_shape(shape: tuple[int, ...]) -> tuple[int | str, ...]:
    return tuple(("batch" if i == 0 else f"dim{i}") if d < 0 else int(d) for i, d in enumerate(shape))


class TensorRTRunner:
    """A loaded ``model.plan``: numpy in, numpy out; per-layer times from the engine's IProfiler."""

    backend = "tensorrt"

    def __init__(self, path: Path) -> None:
        from deploycompress_device.trt import TrtRunner

        try:
            self._runner = TrtRunner(path)
        except DeviceBuildError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc
        self.path = Path(path)
        self.inputs = [TensorSpec(n, _spec_shape(s), d) for n, s, d in self._runner.inputs]
        self.outputs = [TensorSpec(n, _spec_shape(s), d) for n, s, d in self._runner.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._runner.run(named_feeds(feeds, self.inputs, "tensorrt"))
        except DeviceBuildError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc

    def profile(self, feeds: Mapping[str, np.ndarray], iterations: int = 20) -> list[LayerTime]:
        if iterations < 1:
            raise BackendError(f"profile: iterations must be >= 1, got {iterations}")
        rows = self._runner.profile(feeds, iterations=iterations)
        return [LayerTime(name=r["name"], op_type=r["op_type"], mean_ms=float(r["mean_ms"]), calls=int(r["calls"])) for r in rows]


class TensorRTBackend:
    """Builds ``model.plan`` with TensorRT and loads it into a :class:`TensorRTRunner`.

    ``build`` options: every field of :class:`deploycompress_device.plan.BuildOptions` (``strongly_typed``,
    ``workspace_mib``, ``optimization_level``, ``timing_cache``, ``dla_core``, ``gpu_fallback``,
    ``hardware_compatibility``, ``version_compatible``, ``exclude_lean_runtime``, ``refit``,
    ``strip_weights``), plus ``max_batch_size``, ``opt_batch_size`` and ``example_shapes``
    (input name -> shape) for the optimization profiles, or ``profiles`` given whole.
    """

    name = "tensorrt"
    artifact_name = "model.plan"
    #: options build_engine takes for this backend besides build's own: the TensorRT version to check
    #: against, and ``portable`` (write the portable bundle even where TensorRT is installed)
    ENGINE_OPTIONS = ("tensorrt_version", "portable")

    def check_options(self, **options: Any) -> None:
        """Refuse option names neither ``build`` nor :class:`BuildOptions` nor ``ENGINE_OPTIONS`` know
        (ValueError naming them and the known ones), before any work."""
        own = ("max_batch_size", "opt_batch_size", "example_shapes", "profiles", *self.ENGINE_OPTIONS)
        BuildOptions.from_dict({k: v for k, v in options.items() if k not in own})

    def build(
        self,
        onnx_path: Path,
        out_dir: Path,
        *,
        precision: str = "int8",
        max_batch_size: int = 32,
        opt_batch_size: int | None = None,
        example_shapes: Mapping[str, Any] | None = None,
        profiles: Mapping[str, Profile] | None = None,
        **options: Any,
    ) -> Path:
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        if precision not in PRECISIONS:
            raise BackendError(f"tensorrt: precision must be one of {list(PRECISIONS)}, got {precision!r}")
        try:
            opts = BuildOptions.from_dict(options)
        except ValueError as exc:
            raise BackendError(f"tensorrt.build: {exc}") from exc
        if not onnx_path.is_file():
            raise BackendError(f"tensorrt: ONNX file {str(onnx_path)!r} does not exist")
        if not tensorrt_available():
            raise _not_installed("build")
        model = onnx.load(str(onnx_path), load_external_data=False)
        version = tensorrt_version() or "10"
        findings = check_operators(model, version)
        if profiles is None:
            specs = [(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in i.type.tensor_type.shape.dim])
                     for i in model.graph.input]
            example = {k: list(v) for k, v in (example_shapes or {}).items()}
            for name, shape in specs:  # a missing example: batch 1; other dynamic axes must be given
                if name not in example:
                    unsized = [j for j, d in enumerate(shape) if j > 0 and not (isinstance(d, int) and d > 0)]
                    if unsized:
                        raise BackendError(f"tensorrt: input {name!r} {shape} has dynamic axes {unsized} besides the batch: "
                                           "give example_shapes={name: shape} or profiles")
                    example[name] = [1 if j == 0 else int(d) for j, d in enumerate(shape)]
            try:
                profiles = make_profiles(specs, example, max_batch_size=max_batch_size, opt_batch_size=opt_batch_size,
                                         static=opts.dla_core is not None)
            except ValueError as exc:
                raise BackendError(f"tensorrt: {exc}") from exc
        if opts.dla_core is not None:
            static = {n: list(p.opt) for n, p in profiles.items() if p.static}
            findings += check_dla(model, trt_version=version, precision=precision, gpu_fallback=opts.gpu_fallback,
                                  static_shapes=static).findings
        if errors(findings):
            raise BackendError("tensorrt: pre-build checks failed for " + onnx_path.name + ":\n  "
                               + "\n  ".join(f"{f.node}: [{f.rule}] {f.message}" for f in errors(findings)))
        from deploycompress_device.files import write_bytes_atomic
        from deploycompress_device.trt import build_engine

        try:
            built = build_engine(onnx_path, precision=precision, profiles=profiles, options=opts)
        except DeviceBuildError as exc:
            raise BackendError(f"tensorrt: {exc}") from exc
        target = write_bytes_atomic(out_dir / self.artifact_name, built.plan)
        if built.dla_fallback:
            log.warning("tensorrt: %d layer(s) fell back from DLA to the GPU: %s", len(built.dla_fallback), built.dla_fallback[:20])
        return target

    def load(self, artifact_path: Path, **options: Any) -> TensorRTRunner:
        if options:
            raise BackendError(f"tensorrt.load: unknown option(s) {sorted(options)}")
        artifact_path = Path(artifact_path)
        if artifact_path.suffix == ".onnx":
            raise BackendError(f"tensorrt: {artifact_path.name} is the graph of a portable bundle, not an engine; build it on the "
                               "device first: python -m deploycompress_device BUNDLE")
        if not artifact_path.is_file():
            raise BackendError(f"tensorrt: artifact {str(artifact_path)!r} does not exist")
        if not tensorrt_available():
            raise _not_installed("load")
        return TensorRTRunner(artifact_path)

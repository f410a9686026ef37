"""The build plan of a portable bundle (JSON) and the equivalent ``trtexec`` / ``polygraphy convert`` lines.

Precision reaches a TensorRT 11 engine only through the graph: every network is strongly typed, the
builder's precision flags, the int8 calibrators and trtexec's ``--int8/--fp16/--best`` are gone. So the
plan names one graph per precision (``int8``: the QDQ graph, ``fp16``: the graph converted to fp16) and
TensorRT 10 (JetPack 6), which still takes the flags, gets them only where the network is weakly typed.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "BuildOptions",
    "BuildPlan",
    "HARDWARE_COMPATIBILITY",
    "PLAN_NAME",
    "PLAN_VERSION",
    "PRECISIONS",
    "TENSORRT_RANGE",
    "Profile",
    "network_is_strongly_typed",
    "trtexec_command",
    "polygraphy_command",
    "write_json_atomic",
    "make_profiles",
]

PLAN_NAME = "build_plan.json"
PLAN_VERSION = 1
PRECISIONS = ("int8", "fp16", "fp32")
#: TensorRT releases the plan is written for: 10.x (flags or strongly typed) and 11.x (strongly typed only)
TENSORRT_RANGE = {"min": "10.0", "below": "12.0"}
#: option value -> (TensorRT enum member, trtexec word, polygraphy word)
HARDWARE_COMPATIBILITY = {
    "none": ("NONE", "none", "none"),
    "ampere_plus": ("AMPERE_PLUS", "ampere+", "ampere_plus"),
    "same_compute_capability": ("SAME_COMPUTE_CAPABILITY", "sameComputeCapability", "same_compute_capability"),
}
#: on/off BuildOptions field -> (trtexec flag, polygraphy convert flag), the same switch for both tools
SWITCH_FLAGS = {
    "version_compatible": ("--versionCompatible", "--version-compatible"),
    "exclude_lean_runtime": ("--excludeLeanRuntime", "--exclude-lean-runtime"),
    "refit": ("--refit", "--refittable"),
    "strip_weights": ("--stripWeights", "--strip-plan"),
}


@dataclass(frozen=True)
class Profile:
    """One optimization-profile entry: min/opt/max shapes of an input (every dynamic axis gets a range)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[int]]) -> "Profile":
        return cls(tuple(int(x) for x in d["min"]), tuple(int(x) for x in d["opt"]), tuple(int(x) for x in d["max"]))

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max


@dataclass
class BuildOptions:
    """How the engine is built. Names follow TensorRT's builder config.

    ``strongly_typed``: None decides from the TensorRT version and the graph (see
    :func:`network_is_strongly_typed`). ``workspace_mib``: ``MemoryPoolType.WORKSPACE`` limit.
    ``optimization_level``: ``builder_optimization_level`` 0-5 (TensorRT's default 3). ``timing_cache``:
    file loaded before and saved after the build. ``dla_core`` with ``gpu_fallback``: DLA, layers DLA
    cannot run go to the GPU. ``hardware_compatibility``: one of :data:`HARDWARE_COMPATIBILITY`.
    ``version_compatible`` (+ ``exclude_lean_runtime``), ``refit`` and ``strip_weights``: the builder
    flags of the same names (``STRIP_PLAN``).
    """

    strongly_typed: bool | None = None
    workspace_mib: int | None = None
    optimization_level: int | None = None
    timing_cache: str | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    refit: bool = False
    strip_weights: bool = False

    def __post_init__(self) -> None:
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ValueError(f"hardware_compatibility must be one of {list(HARDWARE_COMPATIBILITY)}, got {self.hardware_compatibility!r}")
        if self.optimization_level is not None and not 0 <= int(self.optimization_level) <= 5:
            raise ValueError(f"optimization_level must be 0-5, got {self.optimization_level}")
        if self.workspace_mib is not None and int(self.workspace_mib) < 1:
            raise ValueError(f"workspace_mib must be >= 1, got {self.workspace_mib}")
        if self.dla_core is not None and int(self.dla_core) < 0:
            raise ValueError(f"dla_core must be >= 0, got {self.dla_core}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ValueError("exclude_lean_runtime needs version_compatible")
        if self.strip_weights and not self.refit:
            raise ValueError("strip_weights needs refit (the weights are refitted from the ONNX at load)")
        if self.dla_core is not None and self.hardware_compatibility != "none":
            raise ValueError("a DLA engine cannot be hardware-compatible across GPUs; set hardware_compatibility='none'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TensorRT build option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def network_is_strongly_typed(trt_major: int, has_qdq: bool, has_fp16: bool, override: bool | None = None) -> bool:
    """TensorRT 11: always (the only mode). TensorRT 10: when the graph carries Q/DQ or fp16 types, so
    the graph's types are the engine's; a plain fp32 graph is weakly typed and takes the precision
    flags. ``override`` (BuildOptions.strongly_typed) wins on TensorRT 10; TensorRT 11 refuses False."""
    if trt_major >= 11:
        if override is False:
            raise ValueError("TensorRT >= 11 builds strongly typed networks only; strongly_typed=False is not possible")
        return True
    if trt_major < 10:
        raise ValueError(f"TensorRT {trt_major} is older than this project supports (>= 10)")
    if override is not None:
        return override
    return has_qdq or has_fp16


def _shape(dims: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in dims)


def trtexec_command(graph: str, plan: str, precision: str, trt_major: int, profiles: Mapping[str, Profile],
                    options: BuildOptions, *, strongly_typed: bool) -> list[str]:
    """The ``trtexec`` line that builds what :func:`deploycompress_device.trt.build_engine` builds."""
    cmd = ["trtexec", f"--onnx={graph}", f"--saveEngine={plan}"]
    dynamic = {n: p for n, p in profiles.items()}
    if dynamic:
        for key in ("min", "opt", "max"):
            cmd.append(f"--{key}Shapes=" + ",".join(f"{n}:{_shape(getattr(p, key))}" for n, p in dynamic.items()))
    if trt_major < 11:
        if strongly_typed:
            cmd.append("--stronglyTyped")
        elif precision == "int8":
            cmd += ["--int8", "--fp16"]  # QDQ layers in int8, the rest may take fp16
        elif precision == "fp16":
            cmd.append("--fp16")
    if options.workspace_mib:
        cmd.append(f"--memPoolSize=workspace:{int(options.workspace_mib)}M")
    if options.optimization_level is not None:
        cmd.append(f"--builderOptimizationLevel={int(options.optimization_level)}")
    if options.timing_cache:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    if options.dla_core is not None:
        cmd.append(f"--useDLACore={int(options.dla_core)}")
        if options.gpu_fallback:
            cmd.append("--allowGPUFallback")
    if options.hardware_compatibility != "none":
        cmd.append(f"--hardwareCompatibilityLevel={HARDWARE_COMPATIBILITY[options.hardware_compatibility][1]}")
    cmd += [flags[0] for option, flags in SWITCH_FLAGS.items() if getattr(options, option)]
    cmd += ["--profilingVerbosity=detailed", "--dumpLayerInfo", "--dumpProfile", "--separateProfileRun"]
    return cmd


def polygraphy_command(graph: str, plan: str, precision: str, trt_major: int, profiles: Mapping[str, Profile],
                       options: BuildOptions, *, strongly_typed: bool) -> list[str]:
    """The ``polygraphy convert`` line for the same engine."""
    cmd = ["polygraphy", "convert", graph, "--convert-to", "trt", "-o", plan]
    for key in ("min", "opt", "max"):
        for n, p in profiles.items():
            cmd += [f"--trt-{key}-shapes", f"{n}:[{','.join(str(int(d)) for d in getattr(p, key))}]"]
    if trt_major < 11:
        if strongly_typed:
            cmd.append("--strongly-typed")
        elif precision == "int8":
            cmd += ["--int8", "--fp16"]
        elif precision == "fp16":
            cmd.append("--fp16")
    if options.workspace_mib:
        cmd += ["--pool-limit", f"workspace:{int(options.workspace_mib)}M"]
    if options.optimization_level is not None:
        cmd += ["--builder-optimization-level", str(int(options.optimization_level))]
    if options.timing_cache:
        cmd += ["--load-timing-cache", options.timing_cache, "--save-timing-cache", options.timing_cache]
    if options.dla_core is not None:
        cmd.append("--use-dla")
        if options.gpu_fallback:
            cmd.append("--allow-gpu-fallback")
    if options.hardware_compatibility != "none":
        cmd += ["--hardware-compatibility-level", HARDWARE_COMPATIBILITY[options.hardware_compatibility][2]]
    cmd += [flags[1] for option, flags in SWITCH_FLAGS.items() if getattr(options, option)]
    return cmd


@dataclass
class BuildPlan:
    """What the device builds: graphs per precision (paths relative to the bundle), profiles, options,
    tolerances against the golden outputs, and the TensorRT versions the plan is written for."""

    name: str
    precision: str
    graphs: dict[str, str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profiles: dict[str, Profile]
    options: BuildOptions = field(default_factory=BuildOptions)
    graph_types: dict[str, dict[str, bool]] = field(default_factory=dict)  # precision -> {"qdq": .., "fp16": ..}
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    golden: str | None = None
    triton_config: str | None = None
    max_batch_size: int = 0
    tensorrt: dict[str, str] = field(default_factory=lambda: dict(TENSORRT_RANGE))
    findings: list[dict[str, str]] = field(default_factory=list)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.precision not in self.graphs:
            raise ValueError(f"the plan has no graph for its precision {self.precision!r}: {sorted(self.graphs)}")

    def commands(self, graph_root: str = "") -> dict[str, str]:
        """trtexec and polygraphy lines for TensorRT 10 and 11, one per precision graph."""
        out: dict[str, str] = {}
        for precision, rel in sorted(self.graphs.items()):
            types = self.graph_types.get(precision, {})
            graph = os.path.join(graph_root, rel) if graph_root else rel
            for major in (10, 11):
                st = network_is_strongly_typed(major, types.get("qdq", False), types.get("fp16", False),
                                               None if major >= 11 else self.options.strongly_typed)
                plan = f"model.{precision}.trt{major}.plan"
                out[f"trtexec_trt{major}_{precision}"] = shlex.join(
                    trtexec_command(graph, plan, precision, major, self.profiles, self.options, strongly_typed=st))
                out[f"polygraphy_trt{major}_{precision}"] = shlex.join(
                    polygraphy_command(graph, plan, precision, major, self.profiles, self.options, strongly_typed=st))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("profiles", "options")}
        d["profiles"] = {n: p.to_dict() for n, p in self.profiles.items()}
        d["options"] = self.options.to_dict()
        d["commands"] = self.commands()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildPlan":
        if int(d.get("version", -1)) != PLAN_VERSION:
            raise ValueError(f"build plan version {d.get('version')!r}; this reader knows version {PLAN_VERSION}")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["profiles"] = {n: Profile.from_dict(p) for n, p in d.get("profiles", {}).items()}
        fields["options"] = BuildOptions.from_dict(d.get("options", {}))
        return cls(**fields)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BuildPlan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the build plan {str(path)!r}: {exc}") from exc
        return cls.from_dict(data)


def write_json_atomic(path: Path, data: Any) -> Path:
    """JSON written next to ``path`` and renamed into place."""
    from .files import write_bytes_atomic

    return write_bytes_atomic(path, json.dumps(data, indent=1).encode())


def make_profiles(
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    example_shapes: Mapping[str, Sequence[int]],
    *,
    max_batch_size: int,
    opt_batch_size: int | None = None,
    static: bool = False,
) -> dict[str, Profile]:
    """Optimization profiles for every input with a dynamic axis.

    ``inputs``: (name, shape) with a string (or a value <= 0) for a dynamic axis. A dynamic axis 0 is
    the batch: min 1, opt ``opt_batch_size`` (default: the example's batch), max ``max_batch_size``.
    Any other dynamic axis takes the example's size as min = opt = max (said in the log). ``static``
    (DLA) pins every axis to the example's shape.
    """
    profiles: dict[str, Profile] = {}
    for name, shape in inputs:
        dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int) or d <= 0]
        if not dynamic:
            continue
        example = [int(d) for d in example_shapes.get(name, ())]
        if len(example) != len(shape):
            raise ValueError(f"input {name!r} has dynamic axes {dynamic} of {list(shape)} and no example shape to size them")
        lo, opt, hi = list(example), list(example), list(example)
        if 0 in dynamic and not static:
            if max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1 for the dynamic batch of {name!r}, got {max_batch_size}")
            lo[0], hi[0] = 1, int(max_batch_size)
            opt[0] = min(max(1, int(opt_batch_size or example[0])), int(max_batch_size))
        others = [i for i in dynamic if i != 0 or static]
        if others:
            import logging

            logging.getLogger(__name__).info("input %s: dynamic axes %s fixed to the example's sizes %s", name, others, example)
        profiles[name] = Profile(tuple(lo), tuple(opt), tuple(hi))
    return profiles

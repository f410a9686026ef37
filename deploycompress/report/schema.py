"""report.json: the versioned record of one build (latency, per-layer time, sizes, accuracy).

The HTML page and the terminal summary are both rendered from this one object, so what a person
reads and what a CI job parses never disagree.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..validate.latency import LatencyStats

__all__ = [
    "REPORT_VERSION",
    "REPORT_JSON",
    "REPORT_HTML",
    "ReportError",
    "LatencyRecord",
    "LayerRecord",
    "SizeRecord",
    "AccuracyRecord",
    "FidelityRecord",
    "Report",
    "check_versioned",
    "read_json",
]

REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_MAX_SAMPLES = 2000  # enough for a distribution plot, small enough for a JSON file
_MAX_LAYERS = 50


class ReportError(InputError, ValueError):
    """A report file that cannot be read: the message names the file and the field."""


@dataclass(frozen=True)
class LatencyRecord(LatencyStats):
    """validate's LatencyStats of one (backend, precision, batch size); times in ms per batch,
    ``throughput`` in samples (not batches) per second, ``samples_ms`` thinned for the plot."""

    backend: str = ""
    precision: str = ""

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} b{self.batch_size}"

    @classmethod
    def from_stats(cls, stats: LatencyStats, backend: str, precision: str) -> "LatencyRecord":
        samples = np.sort(np.asarray(stats.samples_ms or (), dtype=np.float64))
        if samples.size > _MAX_SAMPLES:  # evenly spaced quantiles keep the distribution's shape
            samples = samples[np.linspace(0, samples.size - 1, _MAX_SAMPLES).astype(int)]
        values = {f.name: getattr(stats, f.name) for f in fields(LatencyStats)}
        values["samples_ms"] = tuple(round(float(v), 5) for v in samples)
        return cls(**values, backend=backend, precision=precision)

    @classmethod
    def from_samples(cls, backend: str, precision: str, batch_size: int, samples_ms: Sequence[float]) -> "LatencyRecord":
        if len(samples_ms) == 0:
            raise ReportError(f"latency of {backend} {precision} batch {batch_size}: no samples")
        return cls.from_stats(LatencyStats.from_times(int(batch_size), samples_ms), backend, precision)


@dataclass
class LayerRecord:
    name: str
    op_type: str
    mean_ms: float
    calls: int = 1


@dataclass
class SizeRecord:
    """Model size at one stage ("original", "pruned", "deployed"); None where not measured."""

    stage: str
    params: int | None = None
    flops: int | None = None
    size_bytes: int | None = None


@dataclass
class AccuracyRecord:
    """A metric of a deployed model next to the same metric of its reference."""

    label: str
    metric: str
    value: float
    reference_label: str
    reference_value: float

    @property
    def delta(self) -> float:
        return self.value - self.reference_value


@dataclass
class FidelityRecord:
    """How closely a deployed model's outputs follow its PyTorch reference on the same inputs."""

    label: str
    reference_label: str
    max_abs_error: float
    cosine_similarity: float
    top1_agreement: float | None = None
    output: str = ""  # the graph output compared ("" for a one-output model's only output)


_LISTS = {"latency": LatencyRecord, "layers": LayerRecord, "sizes": SizeRecord, "accuracy": AccuracyRecord, "fidelity": FidelityRecord}


@dataclass
class Report:
    name: str
    backend: str
    precision: str
    latency: list[LatencyRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    sizes: list[SizeRecord] = field(default_factory=list)
    accuracy: list[AccuracyRecord] = field(default_factory=list)
    fidelity: list[FidelityRecord] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)  # build step -> seconds
    environment: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the QDQ graph: target, lint findings, weighted ops left in float, calibration entries skipped
    qdq: dict[str, Any] = field(default_factory=dict)
    #: int8 builds: per selected weighted layer, whether it runs in int8 (precision_audit.PrecisionAudit.to_dict)
    quantized_layers: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: int = REPORT_VERSION

    def set_layers(self, layers: Iterable[Any], top: int = _MAX_LAYERS) -> None:
        """Keep the ``top`` slowest layers; accepts LayerTime or LayerRecord objects."""
        records = [LayerRecord(name=l.name, op_type=l.op_type, mean_ms=float(l.mean_ms), calls=int(getattr(l, "calls", 1))) for l in layers]
        self.layers = sorted(records, key=lambda r: r.mean_ms, reverse=True)[:top]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "report") -> "Report":
        check_versioned(data, REPORT_VERSION, ReportError, f"{source}: report")
        kwargs: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReportError(f"{source}: unknown field(s) {unknown}")
        for key, value in data.items():
            if key in _LISTS:
                record_cls = _LISTS[key]
                try:
                    if key == "latency":
                        value = [{**item, "samples_ms": tuple(item.get("samples_ms", ()))} for item in value]
                    kwargs[key] = [record_cls(**item) for item in value]
                except TypeError as exc:
                    raise ReportError(f"{source}: field {key!r}: {exc}") from None
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ReportError(f"{source}: {exc}") from None

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write report.json and the self-contained report.html into ``directory``."""
        from .html import render_html

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, html_path = directory / REPORT_JSON, directory / REPORT_HTML
        json_path.write_text(json.dumps(self.to_dict(), indent=1))
        html_path.write_text(render_html(self))
        return json_path, html_path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Report":
        """Read report.json (or the report.json inside a bundle directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_JSON
        return cls.from_dict(read_json(path, ReportError, "report file"), source=str(path))


def check_versioned(data: Any, version: int, error: type[Exception], what: str) -> None:
    """A versioned on-disk object: a JSON object whose ``version`` this build reads."""
    if not isinstance(data, Mapping):
        raise error(f"{what}: expected a JSON object, got {type(data).__name__}")
    if data.get("version") != version:
        raise error(f"{what} version {data.get('version')!r} is not supported (this build reads {version})")


def read_json(path: Path, error: type[Exception], what: str) -> Any:
    """Parse a JSON file; a missing or malformed file raises ``error`` naming the path."""
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None

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
]

REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_MAX_SAMPLES = 2000  # enough for a distribution plot, small enough for a JSON file
_MAX_LAYERS = 50


class ReportError(ValueError):
    """A report file that cannot be read: the message names the file and the field."""


@dataclass
class LatencyRecord:
    """Latency of one (backend, precision, batch size); times in milliseconds per batch."""

    backend: str
    precision: str
    batch_size: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples (not batches) per second
    iterations: int
    samples_ms: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision} b{self.batch_size}"

    @classmethod
    def from_stats(cls, stats: Any, backend: str, precision: str) -> "LatencyRecord":
        """From validate's LatencyStats (its percentiles as measured; samples thinned for the plot)."""
        samples = np.asarray(getattr(stats, "samples_ms", ()) or (), dtype=np.float64)
        if samples.size > _MAX_SAMPLES:
            samples = np.sort(samples)[np.linspace(0, samples.size - 1, _MAX_SAMPLES).astype(int)]
        return cls(
            backend=backend,
            precision=precision,
            batch_size=int(stats.batch_size),
            mean_ms=float(stats.mean_ms),
            p50_ms=float(stats.p50_ms),
            p90_ms=float(stats.p90_ms),
            p95_ms=float(stats.p95_ms),
            p99_ms=float(stats.p99_ms),
            min_ms=float(stats.min_ms),
            max_ms=float(stats.max_ms),
            throughput=float(stats.throughput),
            iterations=int(stats.iterations),
            samples_ms=[round(float(v), 5) for v in samples],
        )

    @classmethod
    def from_samples(cls, backend: str, precision: str, batch_size: int, samples_ms: Sequence[float]) -> "LatencyRecord":
        s = np.asarray(samples_ms, dtype=np.float64)
        if s.size == 0:
            raise ReportError(f"latency of {backend} {precision} batch {batch_size}: no samples")
        mean = float(s.mean())
        kept = s if s.size <= _MAX_SAMPLES else np.sort(s)[np.linspace(0, s.size - 1, _MAX_SAMPLES).astype(int)]
        return cls(
            backend=backend,
            precision=precision,
            batch_size=int(batch_size),
            mean_ms=mean,
            p50_ms=float(np.percentile(s, 50)),
            p90_ms=float(np.percentile(s, 90)),
            p95_ms=float(np.percentile(s, 95)),
            p99_ms=float(np.percentile(s, 99)),
            min_ms=float(s.min()),
            max_ms=float(s.max()),
            throughput=batch_size * 1000.0 / mean if mean > 0 else float("inf"),
            iterations=int(s.size),
            samples_ms=[round(float(v), 5) for v in kept],
        )


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
        if not isinstance(data, Mapping):
            raise ReportError(f"{source}: expected a JSON object")
        if data.get("version") != REPORT_VERSION:
            raise ReportError(f"{source}: report version {data.get('version')!r} is not supported (this build reads {REPORT_VERSION})")
        kwargs: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReportError(f"{source}: unknown field(s) {unknown}")
        for key, value in data.items():
            if key in _LISTS:
                record_cls = _LISTS[key]
                try:
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
        if not path.is_file():
            raise ReportError(f"report file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

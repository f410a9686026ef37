"""Reports of a build: versioned report.json, self-contained report.html, terminal summary."""

from .html import render_html
from .schema import (
    REPORT_VERSION,
    AccuracyRecord,
    FidelityRecord,
    LatencyRecord,
    LayerRecord,
    Report,
    ReportError,
    SizeRecord,
)
from .summary import performance_summary, report_summary

__all__ = [
    "REPORT_VERSION",
    "AccuracyRecord",
    "FidelityRecord",
    "LatencyRecord",
    "LayerRecord",
    "Report",
    "ReportError",
    "SizeRecord",
    "performance_summary",
    "render_html",
    "report_summary",
]

"""Latency and accuracy of a deployed model against its PyTorch reference; cross-backend comparison."""

from .accuracy import AccuracyStats, MetricResult, compare_outputs, top1_accuracy
from .compare import BackendComparison, compare_backends
from .latency import LatencyStats, batch_feeds, measure_latency
from .export_check import ExportMismatchError, check_export
from .validate import ValidationResult, input_arrays, primary_output, run_batched, validate

__all__ = [
    "ExportMismatchError",
    "check_export",
    "input_arrays",
    "primary_output",
    "AccuracyStats",
    "BackendComparison",
    "LatencyStats",
    "MetricResult",
    "ValidationResult",
    "batch_feeds",
    "compare_backends",
    "compare_outputs",
    "measure_latency",
    "run_batched",
    "top1_accuracy",
    "validate",
]

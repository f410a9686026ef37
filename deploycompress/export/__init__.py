"""ONNX export with a verified module -> node/tensor map, QDQ graph surgery and its lint."""

from .lint import LINT_RULES, LintFinding, lint_qdq
from .name_map import ModuleMapping, NameMap, NameMapError
from .onnx_export import ExportError, ExportResult, TracerWarning, to_onnx
from .qdq import TARGETS, CalibrationSkippedWarning, QDQError, insert_qdq, needs_reduced_range, skipped_calibration
from .targets import QDQ_TARGETS, QDQTarget, get_target, register_target
from .fp16 import FP32_OPS, Fp16RangeWarning, to_fp16
from .tensorrt_checks import TensorRTCheck, check_tensorrt

__all__ = [
    "CalibrationSkippedWarning",
    "QDQ_TARGETS",
    "QDQTarget",
    "TracerWarning",
    "get_target",
    "register_target",
    "skipped_calibration",
    "ExportError",
    "ExportResult",
    "LINT_RULES",
    "LintFinding",
    "ModuleMapping",
    "NameMap",
    "NameMapError",
    "QDQError",
    "TARGETS",
    "insert_qdq",
    "lint_qdq",
    "needs_reduced_range",
    "to_onnx",
    "FP32_OPS",
    "Fp16RangeWarning",
    "to_fp16",
    "TensorRTCheck",
    "check_tensorrt",
]

"""Range estimation on numpy arrays (no torch): the numbers behind every quantized tensor."""

from .base import Calibrator
from .entropy import EntropyCalibrator
from .factory import CALIBRATORS, create_calibrator
from .histogram import HistogramCalibrator, StreamingHistogram
from .minmax import MinMaxCalibrator
from .mse import MSECalibrator
from .params import QuantError, QuantParams, dequantize, params_from_range, params_from_scale, qrange, quantize
from .percentile import PercentileCalibrator

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MSECalibrator",
    "MinMaxCalibrator",
    "PercentileCalibrator",
    "QuantError",
    "QuantParams",
    "StreamingHistogram",
    "create_calibrator",
    "dequantize",
    "params_from_range",
    "params_from_scale",
    "qrange",
    "quantize",
]

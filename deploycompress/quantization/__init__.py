"""Simulated quantization and the calibration it produces."""

from .binary import BNNQuantizer, DoReFaQuantizer
from .bn_fold import fold_batchnorm
from .calib_config import CALIB_VERSION, CalibConfig, CalibConfigError
from .fake_quant import fake_quantize, fake_quantize_ste
from .lsq import LSQQuantizer
from .nni_calib import NNIImportWarning
from .ptq import NaiveQuantizer, PTQQuantizer
from .qat import QATQuantizer
from .quantizer import Quantizer, QuantizerError
from .wrapper import QuantWrapper

__all__ = [
    "BNNQuantizer",
    "CALIB_VERSION",
    "CalibConfig",
    "CalibConfigError",
    "DoReFaQuantizer",
    "LSQQuantizer",
    "NNIImportWarning",
    "NaiveQuantizer",
    "PTQQuantizer",
    "QATQuantizer",
    "QuantWrapper",
    "Quantizer",
    "QuantizerError",
    "fake_quantize",
    "fake_quantize_ste",
    "fold_batchnorm",
]

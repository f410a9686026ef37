"""Range estimation on numpy arrays (no torch): the numbers behind every quantized tensor."""

from .params import QuantError, QuantParams, params_from_range, qrange

__all__ = ["QuantError", "QuantParams", "params_from_range", "qrange"]

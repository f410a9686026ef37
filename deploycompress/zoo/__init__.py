"""Small real models and data that ship with packages (no downloads): used by tests, examples, benchmarks."""

from .digits import DigitsData, DigitsNet, accuracy, load_digits_data, train

__all__ = ["DigitsData", "DigitsNet", "accuracy", "load_digits_data", "train"]

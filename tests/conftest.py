"""Fixtures shared across test files: the real digits data and one trained DigitsNet per session."""

from __future__ import annotations

import copy

import pytest
import torch

from deploycompress.zoo import DigitsData, DigitsNet, accuracy, load_digits_data, train


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    return load_digits_data()


@pytest.fixture(scope="session")
def _trained_digits(digits_data):
    torch.manual_seed(0)
    model = train(DigitsNet(width=16), digits_data, epochs=10)
    return model, accuracy(model, digits_data.test_x, digits_data.test_y)


@pytest.fixture
def trained_digits(_trained_digits):
    """A fresh copy of a DigitsNet(width=16) trained 10 epochs, with its fp32 test accuracy."""
    model, acc = _trained_digits
    return copy.deepcopy(model), acc

"""Factories and data for ``recipe.yaml`` (the CLI imports them as ``digits_data:NAME``)."""

from __future__ import annotations

import numpy as np

from deploycompress.zoo import DigitsNet, load_digits_data, train


def trained_digits_net(width: int = 16, epochs: int = 8) -> DigitsNet:
    """A DigitsNet trained on load_digits for a few epochs: the model the recipe compresses."""
    return train(DigitsNet(width=width), load_digits_data(), epochs=epochs)


def finetune(model: DigitsNet, epochs: int = 2) -> None:
    """Recover the accuracy pruning cost; the pruner's masks keep pruned weights at zero meanwhile."""
    train(model, load_digits_data(), epochs=epochs, lr=1e-3)


def calibration_batches(batch_size: int = 64) -> list[np.ndarray]:
    """Training images as calibration batches (labels dropped)."""
    return [b.numpy() for b in load_digits_data().batches(batch_size)]


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """Held-out images and labels the engine is validated on."""
    data = load_digits_data()
    return data.test_x.numpy(), data.test_y.numpy()

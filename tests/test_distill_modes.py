"""distill(train_mode=False): the student's weights learn while BatchNorm keeps its running statistics."""

import copy

import torch
from torch import nn

from deploycompress.pruning.distill import distill


def _cnn(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)).eval()  # fmt: skip


def _run(train_mode: bool):
    torch.manual_seed(0)
    teacher, student = _cnn(8), _cnn(6)
    x = torch.randn(32, 3, 8, 8) * 3 + 1  # far from the running statistics' start (mean 0, var 1)
    before = copy.deepcopy(student)
    result = distill(student, teacher, list(x.split(8)), steps=40, lr=1e-2, loss="mse", progress=False, train_mode=train_mode)
    return before, student, teacher, x, result


def test_eval_mode_keeps_running_statistics_and_learns():
    before, student, teacher, x, result = _run(train_mode=False)
    bn0, bn1 = before[1], student[1]
    assert torch.equal(bn0.running_mean, bn1.running_mean) and torch.equal(bn0.running_var, bn1.running_var)
    assert int(bn1.num_batches_tracked) == 0
    assert not torch.equal(before[0].weight, student[0].weight)
    assert not student.training
    with torch.no_grad():
        err0, err1 = ((before(x) - teacher(x)) ** 2).mean(), ((student(x) - teacher(x)) ** 2).mean()
    assert err1 < 0.5 * err0, (float(err0), float(err1))
    assert result.last_loss < result.first_loss


def test_train_mode_updates_running_statistics():
    before, student, *_ = _run(train_mode=True)
    assert int(student[1].num_batches_tracked) == 40
    assert not torch.equal(before[1].running_mean, student[1].running_mean)

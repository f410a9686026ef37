"""Tiny model families for the build_engine conformance matrix: each one an ordinary real-model shape
(residuals with BatchNorm, depthwise+SE, two inputs, dict outputs, a shared module, padded Conv1d,
a U-Net, a transformer encoder taking ids and a mask). 16x16 inputs, widths of 4-16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # as after training: non-trivial statistics and affine terms
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class ResCNN(nn.Module):
    """stem, one post-activation residual block (the input feeds a conv and the skip), pool, classifier."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = _bn(c)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = _bn(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = _bn(c)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.relu0(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(self.relu2(y + x)), 1))


class DepthwiseSE(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.act0 = nn.ReLU()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.act1 = nn.ReLU()
        self.se_pool = nn.AdaptiveAvgPool2d(1)
        self.se_fc1 = nn.Conv2d(c, 4, 1)
        self.se_act = nn.ReLU()
        self.se_fc2 = nn.Conv2d(4, c, 1)
        self.pw = nn.Conv2d(c, 12, 1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.act1(self.dw(self.act0(self.stem(x))))
        x = x * torch.sigmoid(self.se_fc2(self.se_act(self.se_fc1(self.se_pool(x)))))
        return self.fc(torch.flatten(self.pool(self.act2(self.pw(x))), 1))


class TwoInputFusion(nn.Module):
    """An RGB stem and a depth stem, summed."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.rgb = nn.Conv2d(3, c, 3, padding=1)
        self.depth = nn.Conv2d(1, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, rgb, depth):
        x = self.act(self.rgb(rgb) + self.depth(depth))
        return self.fc(torch.flatten(self.pool(self.act2(self.conv(x))), 1))


class MultiHead(nn.Module):
    """A dict of outputs: a feature map and pooled class logits."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.seg = nn.Conv2d(c, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        f = self.act(self.conv(x))
        return {"seg": self.seg(f), "cls": self.fc(torch.flatten(self.pool(f), 1))}


class SharedConv(nn.Module):
    """One Conv2d called twice (shared weights)."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.act0 = nn.ReLU()
        self.c = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.act0(self.inp(x))
        x = self.act(self.c(self.act(self.c(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class PaddedConv1d(nn.Module):
    """A time series: Conv1d with reflect and circular padding, BatchNorm, pool, classifier."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.c1 = nn.Conv1d(2, c, 3, padding=1, padding_mode="reflect")
        self.bn1 = nn.BatchNorm1d(c)
        self.act1 = nn.ReLU()
        self.c2 = nn.Conv1d(c, c, 3, padding=1, padding_mode="circular")
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, classes)
        with torch.no_grad():
            self.bn1.running_var.uniform_(0.5, 1.5)
            self.bn1.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.act2(self.c2(self.act1(self.bn1(self.c1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyUNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.down = nn.Conv2d(3, c, 3, padding=1)
        self.act0 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Conv2d(c, c, 3, padding=1)
        self.act1 = nn.ReLU()
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        s = self.act0(self.down(x))
        m = self.act1(self.mid(self.pool(s)))
        m = F.interpolate(m, scale_factor=2.0, mode="nearest")
        return self.head(self.act2(self.up(torch.cat([m, s], 1))))


class TinyEncoder(nn.Module):
    """Token ids and an attention mask in; pooled class logits out. Linear q/k/v/o, LayerNorm, FFN."""

    def __init__(self, vocab=32, d=16, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 32)
        self.act = nn.ReLU()
        self.ff2 = nn.Linear(32, d)
        self.ln2 = nn.LayerNorm(d)
        self.cls = nn.Linear(d, classes)

    def forward(self, ids, mask):
        x = self.emb(ids)
        att = self.q(x) @ self.k(x).transpose(1, 2) / 4.0
        att = att + (1.0 - mask[:, None, :].float()) * -1e4
        x = self.ln1(x + self.o(torch.softmax(att, -1) @ self.v(x)))
        x = self.ln2(x + self.ff2(self.act(self.ff1(x))))
        w = mask.float()[:, :, None]
        return self.cls((x * w).sum(1) / w.sum(1).clamp(min=1.0))


def _images(n, g):
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def _tokens(n, g):
    ids = torch.randint(0, 32, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[: n // 2, 6:] = 0
    return {"ids": ids, "mask": mask}


#: name -> (factory, data(n, generator) -> example inputs (tensor or dict), prunable op types)
FAMILIES = {
    "rescnn": (ResCNN, _images, ["Conv2d"]),
    "dw_se": (DepthwiseSE, _images, ["Conv2d"]),
    "two_input": (TwoInputFusion, lambda n, g: {"rgb": _images(n, g), "depth": torch.rand(n, 1, 16, 16, generator=g)}, ["Conv2d"]),
    "dict_out": (MultiHead, _images, ["Conv2d"]),
    "shared": (SharedConv, _images, ["Conv2d"]),
    "conv1d": (PaddedConv1d, lambda n, g: torch.randn(n, 2, 16, generator=g), ["Conv1d"]),
    "unet": (TinyUNet, _images, ["Conv2d"]),
    "encoder": (TinyEncoder, _tokens, ["Linear"]),
}


class MHANet(nn.Module):
    """Linear embedding, torchvision-style ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` itself and
    never calls ``out_proj``) with a residual, mean pool, classifier. Input (N, 5, 8) -> (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))

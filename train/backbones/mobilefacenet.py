"""MobileFaceNet (Chen et al., 2018, arXiv:1804.07573), the paper's table 1 at 112×112.

conv3×3/2 64 → dw3×3 64 → bottlenecks (t,c,n,s) = (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2) (2,128,2,1)
→ conv1×1 512 → linear GDConv 7×7 → linear 1×1 to the embedding (here Linear + BN1d). PReLU everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import check_embedding_size, fp32_embedding


class ConvBlock(nn.Module):
    """Conv → BN → (PReLU unless ``linear``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, linear: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.Identity() if linear else nn.PReLU(cout)
        # fan_in accounts for groups (fan_out would not), keeping depthwise layers well scaled
        if linear:
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="linear")
        else:
            nn.init.kaiming_normal_(self.conv.weight, a=0.25, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Inverted residual: 1×1 expand (PReLU) → 3×3 depthwise (PReLU) → 1×1 linear project; skip when shapes match."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.expand = ConvBlock(cin, hidden, 1)
        self.depthwise = ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden)
        self.project = ConvBlock(hidden, cout, 1, linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


#: (expansion t, channels c, repeats n, first stride s) from the paper's table 1.
MOBILEFACENET_SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112×112 inputs; returns N×embedding_size (not normalised)."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, width: float = 1.0, stem_stride: int = 2,
                 input_size: int = 112):
        """``stem_stride=4`` is a CPU-budget variant: every later layer runs at half the resolution
        (≈ 4× fewer MACs); the global depthwise conv then spans 4×4 instead of 7×7."""
        super().__init__()
        if stem_stride not in (2, 4):
            raise ValueError(f"stem_stride must be 2 (the paper) or 4, got {stem_stride}")
        self.embedding_size = check_embedding_size(embedding_size)
        ch = lambda c: max(8, int(round(c * width / 8)) * 8)  # noqa: E731 - width < 1: narrow variant for CPU tests
        layers: list[nn.Module] = [ConvBlock(3, ch(64), 3, stem_stride, 1), ConvBlock(ch(64), ch(64), 3, 1, 1, groups=ch(64))]
        cin = ch(64)
        for t, c, n, s in MOBILEFACENET_SETTING:
            for i in range(n):
                layers.append(Bottleneck(cin, ch(c), t, s if i == 0 else 1))
                cin = ch(c)
        layers.append(ConvBlock(cin, ch(512), 1))
        self.body = nn.Sequential(*layers)
        side = input_size
        for stride in (stem_stride, 2, 2, 2):  # stem, then the three stride-2 bottleneck stages (k3, pad 1)
            side = (side - 1) // stride + 1
        self.gdconv = ConvBlock(ch(512), ch(512), side, groups=ch(512), linear=True)  # global depthwise conv, 7×7 → 1×1
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(ch(512), embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_in", nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gdconv(self.body(x))
        return fp32_embedding(self.fc, self.features, self.dropout(self.flatten(x)))

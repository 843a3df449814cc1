"""iResNet in the insightface arcface_torch layout (Deng et al.; Duta et al. "Improved residual networks").

Stem conv3×3/1 64 + BN + PReLU; four stages of IBasicBlock (BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN,
stride 2 in each stage's first block, 1×1 conv + BN shortcut there); head BN2d → flatten (512·7·7) → dropout
→ FC → BN1d ("features", its scale frozen at 1 as in arcface_torch). State-dict names follow arcface_torch.

The embedding FC and BN1d run in float32 under autocast (:func:`train.backbones.common.fp32_embedding`, as
arcface_torch). ``width`` scales every stage's channels (1.0: the published network; small widths are for
CPU tests only).

One deliberate difference: ``zero_init_residual`` defaults to True (each block's last BN scale starts at 0,
so every residual branch starts as identity). With arcface_torch's N(0, 0.1) conv init and no zeroing, an
untrained network in eval mode overflows (iResNet-100 gives NaN in fp32); training is unaffected either way.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import check_embedding_size, fp32_embedding

IRESNET_LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3),
                  "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """Pre-activation-style basic block used by iResNet."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """iResNet for 112×112 inputs (the FC expects a 7×7 map); returns N×embedding_size."""

    fc_scale = 7 * 7

    def __init__(self, layers: tuple[int, int, int, int], embedding_size: int = 512, dropout: float = 0.0,
                 zero_init_residual: bool = True, width: float = 1.0):
        super().__init__()
        self.embedding_size = check_embedding_size(embedding_size)
        ch = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = ch[0]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch[0], eps=1e-5)
        self.prelu = nn.PReLU(ch[0])
        self.layer1 = self._make_layer(ch[0], layers[0])
        self.layer2 = self._make_layer(ch[1], layers[1])
        self.layer3 = self._make_layer(ch[2], layers[2])
        self.layer4 = self._make_layer(ch[3], layers[3])
        self.bn2 = nn.BatchNorm2d(ch[3], eps=1e-5)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(ch[3] * self.fc_scale, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return fp32_embedding(self.fc, self.features, self.dropout(x))


def make_iresnet(arch: str):
    """A builder ``(embedding_size=512, **kw) -> IResNet`` for one of IRESNET_LAYERS."""
    layers = IRESNET_LAYERS[arch]

    def build(embedding_size: int = 512, **kw) -> IResNet:
        return IResNet(layers, embedding_size, **kw)

    build.__name__ = f"build_{arch}"
    return build

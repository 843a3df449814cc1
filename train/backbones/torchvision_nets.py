"""torchvision ResNet-34/50, ResNeXt-50 (32x4d) and EfficientNet-B0 with the classifier replaced by a BN-neck.

Built with ``weights=None`` (nothing is ever downloaded). At 112×112 the final map is 4×4; it is average-pooled
to 1×1 (the only adaptive pooling) and passed through :class:`EmbeddingNeck`.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import EmbeddingNeck, check_embedding_size


class TorchvisionEmbedder(nn.Module):
    """``body`` (torchvision feature extractor) → global average pool → BN-neck."""

    def __init__(self, body: nn.Module, channels: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.embedding_size = check_embedding_size(embedding_size)
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = EmbeddingNeck(channels, embedding_size, spatial=1, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.pool(self.body(x)))


def _resnet_body(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def make_torchvision(arch: str):
    """A builder ``(embedding_size=512, dropout=0.0) -> TorchvisionEmbedder`` for a torchvision architecture."""

    def build(embedding_size: int = 512, dropout: float = 0.0) -> TorchvisionEmbedder:
        from torchvision import models

        if arch == "efficientnet_b0":
            net = models.efficientnet_b0(weights=None)
            return TorchvisionEmbedder(net.features, net.classifier[1].in_features, embedding_size, dropout)
        factory = {"resnet34": models.resnet34, "resnet50": models.resnet50,
                   "resnext50": models.resnext50_32x4d}[arch]
        net = factory(weights=None)
        return TorchvisionEmbedder(_resnet_body(net), net.fc.in_features, embedding_size, dropout)

    build.__name__ = f"build_{arch}"
    return build

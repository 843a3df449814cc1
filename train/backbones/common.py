"""Small building blocks shared by the backbones (plain nn modules only, so ONNX export stays clean)."""
from __future__ import annotations

import torch
from torch import nn


class EmbeddingNeck(nn.Module):
    """BN-neck turning a C×h×w feature map into an embedding: BN2d → flatten → dropout → Linear → BN1d.

    ``spatial`` is h·w of the incoming map (1 after global pooling, 49 for the 7×7 iResNet head).
    """

    def __init__(self, channels: int, embedding_size: int, spatial: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn2d = nn.BatchNorm2d(channels, eps=1e-5)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(p=float(dropout))
        self.fc = nn.Linear(channels * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_embedding(self.fc, self.features, self.dropout(self.flatten(self.bn2d(x))))


def fp32_embedding(fc: nn.Module, features: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``features(fc(x))`` — the embedding FC and its BN1d — in float32 even under autocast (as arcface_torch
    keeps them: a bf16/fp16 FC over the 25 088-wide iResNet map rounds away much of the embedding)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return features(fc(x.float()))
    return features(fc(x))


def check_embedding_size(embedding_size: int) -> int:
    """Validate and return the embedding size."""
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    return embedding_size

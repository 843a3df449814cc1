"""The stacked-hourglass 5-point aligner network and its builder.

The network sees the square crop that :mod:`runtime.landmarks` cuts around a detector box and predicts
one heatmap per landmark (LANDMARK_NAMES order); ``forward`` returns the last stack's heatmaps (what gets
exported), ``forward_stacks`` every stack's (intermediate supervision). Its config keys and their defaults
are the model part of :data:`train.config.ALIGNER_DEFAULTS`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.geometry import LANDMARK_NAMES
from runtime.landmarks import AlignerGeometry

from .config import ALIGNER_DEFAULTS

NUM_LANDMARKS = len(LANDMARK_NAMES)

#: The config keys that describe the network and its crop (what a checkpoint needs to rebuild the model).
MODEL_KEYS = ("task", "arch", "stacks", "channels", "depth", *AlignerGeometry().to_dict())


class Residual(nn.Module):
    """Bottleneck residual block (1×1 → 3×3 → 1×1, half width inside) with a projection when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = max(cout // 2, 8)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                    nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Hourglass(nn.Module):
    """One hourglass of ``depth`` levels: a skip branch at each resolution plus a pooled branch below it."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.up = Residual(channels, channels)
        self.down = Residual(channels, channels)
        self.inner = Hourglass(depth - 1, channels) if depth > 1 else Residual(channels, channels)
        self.out = Residual(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.out(self.inner(self.down(F.max_pool2d(x, 2))))
        return self.up(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class StackedHourglass(nn.Module):
    """Newell et al.'s stacked hourglass, small: a stem down to the heatmap resolution, ``stacks``
    hourglasses with intermediate heatmaps fed back, ``num_landmarks`` output heatmaps.

    ``forward`` returns the last stack's heatmaps (N, K, h, w) — what gets exported;
    ``forward_stacks`` returns every stack's (intermediate supervision).
    """

    def __init__(self, stacks: int = 2, channels: int = 64, depth: int = 3, stride: int = 4,
                 num_landmarks: int = NUM_LANDMARKS):
        super().__init__()
        if stride not in (1, 2, 4):
            raise ValueError(f"input/heatmap stride must be 1, 2 or 4, got {stride}")
        half = max(channels // 2, 8)
        # cheap stem: two plain 3×3 convolutions reach the heatmap resolution, then one residual block
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2 if stride > 1 else 1, padding=1, bias=False),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, stride=2 if stride == 4 else 1, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            Residual(channels, channels),
        )
        self.hourglasses = nn.ModuleList(Hourglass(depth, channels) for _ in range(stacks))
        self.features = nn.ModuleList(
            nn.Sequential(Residual(channels, channels), nn.Conv2d(channels, channels, 1, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) for _ in range(stacks))
        self.heads = nn.ModuleList(nn.Conv2d(channels, num_landmarks, 1) for _ in range(stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(stacks - 1))
        self.merge_heatmaps = nn.ModuleList(nn.Conv2d(num_landmarks, channels, 1) for _ in range(stacks - 1))
        self.depth = depth

    def forward_stacks(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, hg in enumerate(self.hourglasses):
            feat = self.features[i](hg(x))
            heat = self.heads[i](feat)
            outs.append(heat)
            if i < len(self.hourglasses) - 1:
                x = x + self.merge_features[i](feat) + self.merge_heatmaps[i](heat)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stacks(x)[-1]


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every model and geometry key present (defaults from :data:`ALIGNER_DEFAULTS`)."""
    return {**{k: ALIGNER_DEFAULTS[k] for k in MODEL_KEYS}, **config}


def build_aligner(config: dict[str, Any]) -> StackedHourglass:
    """The (untrained) aligner a config describes: stacks, channels, depth, input/heatmap size."""
    cfg = full_config(config)
    geometry = AlignerGeometry.from_dict(cfg)
    cell = 2 ** int(cfg["depth"])
    if geometry.heatmap_size[0] % cell or geometry.heatmap_size[1] % cell:
        raise ValueError(f"heatmap size {geometry.heatmap_size} must be divisible by 2**depth = {cell}")
    return StackedHourglass(int(cfg["stacks"]), int(cfg["channels"]), int(cfg["depth"]), geometry.stride)

"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) as a PyTorch module.

The layout of dlib's ``anet_type`` (dnn_face_recognition_ex.cpp), 150×150 input: conv7×7/2 (32) → ReLU →
max-pool 3×3/2 → 3 blocks of 32 → 4 of 64 → 3 of 128 → 3 of 256 → 1 of 256 (the first block of each later
stage strides 2; its shortcut is a 2×2 average pool, zero-padded to the wider channel count) → global
average → 128-d linear, no bias. Strided convolutions are unpadded, so a strided block's branch can come out
one pixel smaller than its pooled shortcut; dlib's ``add_prev`` then adds the two zero-padded to the larger
size (bottom and right), and so does :class:`DlibBlock`. The input is dlib's 150×150. dlib's per-channel affine layers are folded into the convolutions (every conv has a
bias and no normalisation follows): this network is meant to start from dlib's weights
(:mod:`train.dlib_import`), not from random ones.

The input is facekit's ``(pixel − 127.5) / 127.5`` RGB tensor; the import folds dlib's own
``(pixel − channel mean) / 256`` into the first convolution, which is exact because it has no padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_embedding_size

#: (channels, blocks) per stage; every stage after the first starts with a stride-2 block.
DLIB_STAGES: tuple[tuple[int, int], ...] = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
#: dlib's input side (``input_rgb_image_sized<150>``).
INPUT_SIZE = 150


class DlibBlock(nn.Module):
    """conv3×3(stride) → ReLU → conv3×3, plus the shortcut (2×2 average pool and channel zero-pad when
    downsampling), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1 if stride == 1 else 0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.extra_channels = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        if self.stride == 1:
            return F.relu(out + x)
        shortcut = F.avg_pool2d(x, 2, 2)
        h, w = max(out.shape[-2], shortcut.shape[-2]), max(out.shape[-1], shortcut.shape[-1])
        out = F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))
        shortcut = F.pad(shortcut, (0, w - shortcut.shape[-1], 0, h - shortcut.shape[-2], 0, self.extra_channels))
        return F.relu(out + shortcut)


class DlibResNet(nn.Module):
    """dlib's 29-conv face ResNet; N×3×150×150 → N×embedding_size (128 for dlib's weights)."""

    def __init__(self, embedding_size: int = 128, fc_bias: bool = False):
        super().__init__()
        self.embedding_size = check_embedding_size(embedding_size)
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        blocks: list[nn.Module] = []
        cin = 32
        for i, (cout, n) in enumerate(DLIB_STAGES):
            for j in range(n):
                blocks.append(DlibBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, embedding_size, bias=fc_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < INPUT_SIZE or x.shape[-1] < INPUT_SIZE:
            raise ValueError(f"DlibResNet takes {INPUT_SIZE}×{INPUT_SIZE} inputs, got {tuple(x.shape[-2:])}")
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

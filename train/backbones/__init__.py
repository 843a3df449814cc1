"""Recognizer backbones by name: ``build_backbone(arch, embedding_size=512, **kw)`` → N×3×112×112 → N×D.

Outputs are not L2-normalised. Every backbone exports with ``torch.onnx.export(..., dynamo=False)``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .dlib_resnet import DlibResNet
from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, make_iresnet
from .mobilefacenet import MobileFaceNet
from .torchvision_nets import TorchvisionEmbedder, make_torchvision

#: name → builder ``(embedding_size=512, **kw) -> nn.Module``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {"mobilefacenet": MobileFaceNet, "dlib_resnet": DlibResNet}
BACKBONES.update({name: make_iresnet(name) for name in IRESNET_LAYERS})
BACKBONES.update({name: make_torchvision(name) for name in ("resnet34", "resnet50", "resnext50", "efficientnet_b0")})


def build_backbone(arch: str, embedding_size: int = 512, **kw) -> nn.Module:
    """Build backbone ``arch`` (a key of :data:`BACKBONES`); ``kw`` go to its builder (e.g. ``dropout``).

    The module gets ``arch`` and ``embedding_size`` attributes.
    """
    key = str(arch).lower().replace("-", "_")
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(sorted(BACKBONES))}")
    try:
        model = BACKBONES[key](embedding_size=embedding_size, **kw)
    except TypeError as e:
        raise TypeError(f"bad options for backbone {key!r}: {e}") from e
    model.arch = key
    model.embedding_size = embedding_size
    return model


__all__ = ["BACKBONES", "build_backbone", "MobileFaceNet", "DlibResNet", "IResNet", "IBasicBlock", "TorchvisionEmbedder"]

"""uint8 crop batches → the model tensor on the training device, derived from the one preprocessing definition.

The loader ships N×H×W×3 uint8 crops (a quarter of float32's bytes through shared memory and the host-to-device
copy); :class:`DeviceNormalizer` turns them into exactly the tensor :func:`runtime.preprocess.to_model_input`
makes (colour order, mean, std and layout read from the :class:`runtime.preprocess.PreprocessSpec`; the same
float32 operations, so the result is bit-identical — tested).
"""
from __future__ import annotations

import torch

from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec


class DeviceNormalizer:
    """``normalizer(batch)``: uint8 N×H×W×3 crops in ``color_order`` (any device) → float32 model input on
    ``device`` (NCHW or NHWC as the spec says; ``channels_last`` keeps NCHW's shape in channels-last memory)."""

    def __init__(self, spec: PreprocessSpec = RECOGNIZER_SPEC, color_order: str = "BGR",
                 device: torch.device | str = "cpu", channels_last: bool = False):
        self.spec, self.device, self.channels_last = spec, torch.device(device), bool(channels_last)
        self.flip = color_order.upper() != spec.color_order
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected N×H×W×3 uint8 crops, got {tuple(batch.shape)} {batch.dtype}")
        if tuple(batch.shape[1:3]) != tuple(self.spec.input_size):
            raise ValueError(f"crops are {batch.shape[1]}×{batch.shape[2]}, the model expects "
                             f"{self.spec.input_size[0]}×{self.spec.input_size[1]}")
        x = batch.to(self.device, non_blocking=True)
        if self.flip:
            x = x.flip(-1)
        x = (x.float() - self.mean) / self.std
        if self.spec.layout == "NCHW":
            x = x.permute(0, 3, 1, 2)
            return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.contiguous()

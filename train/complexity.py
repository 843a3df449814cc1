"""Parameter and multiply-accumulate (MAC) counts of a model for one input image.

What is counted: MACs of ``nn.Conv2d`` (out_elements · in_channels/groups · kh · kw) and ``nn.Linear``
(out_features · in_features per row) — the convention of the MobileFaceNet paper and most papers' "MAdds".
With ``include_elementwise=True`` one MAC per output element of BatchNorm, PReLU/ReLU/SiLU and pooling is
added too (roughly what ptflops adds). Parameters are all ``model.parameters()`` including frozen ones.
"""
from __future__ import annotations

import torch
from torch import nn

_ELEMENTWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.ReLU, nn.SiLU, nn.Sigmoid,
                nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return out[0].numel() * (m.in_channels // m.groups) * kh * kw


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    rows = out[0].numel() // m.out_features
    return rows * m.out_features * m.in_features


def count_params_macs(model: nn.Module, input_size: tuple[int, int] = (112, 112),
                      include_elementwise: bool = False, in_channels: int = 3) -> tuple[int, int]:
    """Return ``(params, macs)`` for one ``in_channels×H×W`` input (eval mode, no gradients).

    The model's training flag is restored afterwards.
    """
    total = [0]

    def hook(module: nn.Module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Conv2d):
            total[0] += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total[0] += _linear_macs(module, output)
        elif include_elementwise and isinstance(module, _ELEMENTWISE):
            total[0] += output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return int(params), int(total[0])

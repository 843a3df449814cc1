"""Function-preserving widening (Net2WiderNet, Chen et al. 2016): start a wider network from a narrower one.

Each channel dimension that grows from ``c`` to ``c'`` gets one mapping ``g: [0, c') → [0, c)``: the first
``c`` channels are the old ones, the others copies of randomly chosen old channels. Every producer's new
output channel copies its source (conv rows, BatchNorm statistics and affine, PReLU slopes, depthwise
kernels), and every reader's weights for a replicated input are divided by the number of copies, so the
wide network computes what the narrow one did, in training and in eval mode. The mapping depends only on
``(c, c')``, which keeps residual streams and their readers consistent. A little noise on the copies'
weights breaks the symmetry (identical units would otherwise get identical gradients forever).
Used by the trainer's ``init_widen: true``.
"""
from __future__ import annotations

from typing import Mapping

import torch


def _mapping(old: int, new: int, generator: torch.Generator, cache: dict) -> torch.Tensor:
    if (old, new) not in cache:
        extra = torch.randint(0, old, (new - old,), generator=generator) if new - old > old else \
            torch.randperm(old, generator=generator)[: new - old]
        cache[(old, new)] = torch.cat([torch.arange(old), extra])
    return cache[(old, new)]


def widen_state_dict(narrow: Mapping[str, torch.Tensor], wide: Mapping[str, torch.Tensor],
                     noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a state dict shaped like ``wide`` that computes what ``narrow`` computes.

    ``noise`` is the std of the symmetry-breaking noise added to the copied units' weights, relative to the
    std of the tensor they came from (0: exact copy). Raises ValueError when the two are not the same
    network at two widths: other keys, another rank, a narrower dimension, or a grown kernel.
    """
    if set(narrow) != set(wide):
        missing, extra = sorted(set(wide) - set(narrow)), sorted(set(narrow) - set(wide))
        raise ValueError(f"not the same network: keys only in the wide one {missing[:3]}, only in the narrow one {extra[:3]}")
    gen = torch.Generator().manual_seed(seed)
    cache: dict = {}
    out: dict[str, torch.Tensor] = {}
    for key, w in wide.items():
        n = narrow[key]
        if n.shape == w.shape:
            out[key] = n.clone()
            continue
        if n.dim() != w.dim() or any(a > b for a, b in zip(n.shape, w.shape)):
            raise ValueError(f"{key}: {tuple(n.shape)} does not fit inside {tuple(w.shape)}")
        if n.dim() > 2 and n.shape[2:] != w.shape[2:]:
            raise ValueError(f"{key}: kernel {tuple(n.shape[2:])} ≠ {tuple(w.shape[2:])}; only channels may grow")
        grown = n
        if n.dim() >= 2 and w.shape[1] > n.shape[1]:  # a reader of a grown input: split the weights over copies
            g = _mapping(n.shape[1], w.shape[1], gen, cache)
            copies = torch.bincount(g, minlength=n.shape[1]).to(n.dtype)
            grown = (grown / copies.view(1, -1, *([1] * (n.dim() - 2))))[:, g]
        if w.shape[0] > n.shape[0]:  # a producer of a grown output: copy the source channels
            g = _mapping(n.shape[0], w.shape[0], gen, cache)
            grown = grown[g].clone()
            if n.dim() >= 2 and noise > 0:
                fresh = grown[n.shape[0]:]
                fresh += noise * float(n.float().std()) * torch.randn(fresh.shape, generator=gen).to(fresh.dtype)
        out[key] = grown.contiguous()
    return out

"""Function-preserving widening (Net2WiderNet, Chen et al. 2016): start a wider network from a narrower one.

Each channel dimension that grows from ``c`` to ``c'`` gets one mapping ``g: [0, c') → [0, c)``: the first
``c`` channels are the old ones, the others copies of randomly chosen old channels. Every producer's new
output channel copies its source (conv rows, BatchNorm statistics and affine, PReLU slopes, depthwise
kernels), and every reader's weights for a replicated input are divided by the number of copies, so the
wide network computes what the narrow one did, in training and in eval mode. The mapping depends only on
``(c, c')``, which keeps residual streams and their readers consistent. A little noise on the copies'
weights breaks the symmetry (identical units would otherwise get identical gradients forever).

    # a checkpoint of the wider network (the config's arch / backbone_kwargs) computing what NARROW computes,
    # then train it with `init: work_data/mbf15_widened.pt`
    python -m recipes.mobilefacenet_distill.widen --narrow runs/mbf_distill_celeba_cycle3/last.pt \
        --config recipes/mobilefacenet_distill/configs/mbf15_distill_celeba_widen.yaml --out work_data/mbf15_widened.pt
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from train.backbones import build_backbone
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import load_config


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


def widen_checkpoint(narrow: str | os.PathLike, config: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``out``: the network ``config`` describes (a wider one of ``narrow``'s architecture), with the
    weights :func:`widen_state_dict` makes from checkpoint ``narrow`` (its margin head kept as it is; the
    embedding size does not change). ValueError when the config's network is not a widening of it."""
    state = load_checkpoint(narrow)
    wide = build_backbone(config["arch"], int(config["embedding_size"]), **config.get("backbone_kwargs", {}))
    model = widen_state_dict(state["model"], wide.state_dict())
    keep = {"head": state["head"]} if "head" in state else {}
    return save_checkpoint(out, {"model": model, "config": config, "step": 0, **keep})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--narrow", required=True, help="checkpoint of the narrower network")
    ap.add_argument("--config", required=True, help="training config of the wider network")
    ap.add_argument("--out", required=True, help="checkpoint to write (use it as the config's `init`)")
    args = ap.parse_args(argv)
    path = widen_checkpoint(args.narrow, load_config(args.config), args.out)
    print(f"{path}: {args.narrow} widened to {args.config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

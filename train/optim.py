"""The optimizer, gradient norms and clipping, and an update that is skipped on non-finite values without the
host waiting for the device.

Skipping: the fused SGD / AdamW kernels take a ``found_inf`` device tensor (the protocol ``torch.amp.GradScaler``
uses) and leave parameters and optimizer state untouched when it is non-zero, so the decision stays on the
device. Where that cannot be used — an optimizer without the fused kernel, fp16's ``GradScaler``, or a step
that would create optimizer state (AdamW's first step for a parameter) — the flag is read on the host
instead.
"""
from __future__ import annotations

from typing import Iterable

import torch


def build_optimizer(o: dict, backbone: list[torch.nn.Parameter], head: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD or AdamW over a backbone and a head parameter group (``optim`` config section), fused when the
    device has the fused kernel.

    SGD's momentum buffers start as zeros for every parameter (the same first update as torch's lazily
    created ones, since there is no dampening), so parameters that start training later (unfreezing) join
    a fused step without special cases."""
    head_wd = o["weight_decay"] if o["head_weight_decay"] is None else o["head_weight_decay"]
    groups = [{"params": backbone, "lr": o["lr"], "weight_decay": o["weight_decay"], "name": "backbone"},
              {"params": head, "lr": o["lr"] * o["head_lr_mult"], "weight_decay": head_wd, "name": "head"}]
    groups = [g for g in groups if g["params"]]
    for fused in (True, False):
        try:
            if o["name"] == "sgd":
                opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                                      fused=fused or None)
                if o["momentum"] > 0:
                    for g in opt.param_groups:
                        for p in g["params"]:
                            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                return opt
            return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), fused=fused or None)
        except (RuntimeError, ValueError, TypeError):
            if not fused:
                raise
    raise AssertionError("unreachable")


def grad_sq_norm(params: Iterable[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """Squared L2 norm of the gradients (float32 0-dim tensor on ``device``; no host synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, 2.0, foreach=None).float().square()


def clip_to(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients so their norm ``total_norm`` is at most ``max_norm`` (no host synchronisation)."""
    grads = [p for p in params if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total_norm, foreach=None)


def _creates_state(optimizer: torch.optim.Optimizer) -> bool:
    """True when this step would create optimizer state (a parameter with a gradient but no state yet)."""
    return any(p.grad is not None and not optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"])


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(g.get("fused") for g in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor, scaler=None) -> None:
    """``optimizer.step()`` unless ``found_inf`` (0-dim float tensor, non-zero = skip; the same on every rank).

    Parameters and optimizer state are left bit-identical by a skipped step."""
    if scaler is not None and scaler.is_enabled():
        if not bool(found_inf.item()):
            scaler.step(optimizer)
        return
    if not _is_fused(optimizer) or _creates_state(optimizer):
        if not bool(found_inf.item()):
            optimizer.step()
        return
    optimizer.grad_scale, optimizer.found_inf = None, found_inf.float().reshape(())
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf

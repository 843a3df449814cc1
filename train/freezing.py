"""The layer-freezing schedule (``schedule.freeze``): which backbone parameters get no update at a step.

The trainable set is fixed when the model is built: the parameters whose ``requires_grad`` the backbone
left on (iResNet's BN1d scale, for one, stays fixed at 1). It never changes afterwards, so DDP, built once,
registers exactly the set the optimizer updates. Freezing a parameter does not touch ``requires_grad`` (DDP
does not support changing it after construction): the parameter's gradient is dropped after backward,
before clipping and the optimizer step, so neither the update, the momentum nor the weight decay touch it,
as for a parameter without a gradient. Its gradient is still computed and all-reduced.
"""
from __future__ import annotations

from torch import nn


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class FreezeSchedule:
    """``rules``: ``[(name prefixes, until_step), ...]``; a parameter under a prefix is frozen while the
    schedule step is below ``until_step``. Prefixes that name no backbone parameter are an error."""

    def __init__(self, rules: list[tuple[list[str], int]], backbone: nn.Module):
        self.rules = [(list(prefixes), int(until)) for prefixes, until in rules]
        self.params = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
        names = [n for n, _ in backbone.named_parameters()]
        for prefixes, _ in self.rules:
            for pre in prefixes:
                if not any(_under(n, pre) for n in names):
                    raise ValueError(f"schedule.freeze: no backbone parameter under {pre!r} "
                                     f"(e.g. {', '.join(sorted({n.split('.')[0] for n in names})[:8])})")

    @property
    def trainable(self) -> frozenset[str]:
        """Names of the backbone parameters that train at some point (fixed at construction)."""
        return frozenset(self.params)

    def frozen(self, step: float) -> frozenset[str]:
        """Names of the trainable parameters frozen at schedule step ``step``."""
        prefixes = [p for pres, until in self.rules if step < until for p in pres]
        return frozenset(n for n in self.params if any(_under(n, p) for p in prefixes))

    def drop_frozen_grads(self, step: float) -> frozenset[str]:
        """Set the gradients of the parameters frozen at ``step`` to None; returns their names."""
        names = self.frozen(step) if self.rules else frozenset()
        for n in names:
            self.params[n].grad = None
        return names

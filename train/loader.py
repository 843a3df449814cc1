"""The DataLoader a training run reads from, and grouping its micro-batches into optimizer steps."""
from __future__ import annotations

import sys
import time
from typing import Iterator

import torch

from .datasets import FaceDataset, worker_init


def build_loader(dataset: FaceDataset, sampler, data: dict, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """DataLoader over ``sampler``'s batches with the ``data`` section's workers, prefetching and pinning.

    Workers are forked on Linux (they share the decoded cache copy-on-write) and run one thread each
    (:func:`train.datasets.worker_init`).
    """
    workers = int(data["workers"])
    pin = data["pin_memory"]
    pin = device.type == "cuda" if pin == "auto" else bool(pin)
    kw: dict = {}
    if workers > 0:
        kw = dict(persistent_workers=bool(data["persistent_workers"]), prefetch_factor=int(data["prefetch_factor"]),
                  worker_init_fn=worker_init)
        if sys.platform.startswith("linux"):
            kw["multiprocessing_context"] = "fork"
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                                       generator=torch.Generator().manual_seed(seed), **kw)


def next_step_batches(it: Iterator[dict], accumulate: int) -> tuple[list[dict] | None, float]:
    """The next ``accumulate`` micro-batches of one optimizer step (None at the end of the epoch) and the
    seconds spent waiting for them."""
    t0, out = time.time(), []
    for _ in range(accumulate):
        try:
            out.append(next(it))
        except StopIteration:
            return None, time.time() - t0
    return out, time.time() - t0

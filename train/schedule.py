"""How far a run is, counted in global samples, and the learning-rate schedule over it.

The schedule's unit is a *schedule step*: ``samples seen / reference global batch``, where the reference
global batch is the global batch (per-process batch × processes × accumulation) the run started with. While
the number of processes stays the same a schedule step is an optimizer step; a run resumed on another number
of processes keeps its learning-rate curve, its warm-up and its freezing schedule at the same *sample*
positions, and ends after the same number of samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


class WarmupCosine:
    """LR factor at (schedule) step k: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` in
    ``restarts + 1`` cycles (each ``mult`` times longer than the previous; SGDR warm restarts)."""

    def __init__(self, total: int, warmup: int = 0, min_ratio: float = 0.0, restarts: int = 0, mult: float = 1.0):
        self.total, self.warmup, self.min_ratio = int(total), int(min(warmup, total)), float(min_ratio)
        self.restarts, self.mult = int(restarts), float(mult)

    def __call__(self, k: float) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        rest = max(1, self.total - self.warmup)
        lengths = [self.mult ** i for i in range(self.restarts + 1)]
        pos = (k - self.warmup) / rest * sum(lengths)
        if pos >= sum(lengths):
            return self.min_ratio
        for length in lengths:
            if pos < length:
                break
            pos -= length
        frac = min(pos / length, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class RunPosition:
    """Where a run stands: optimizer steps taken, epoch, global samples consumed in the epoch and in the run,
    and the reference global batch its schedule counts in (plus the layout that produced the position)."""

    step: int = 0
    epoch: int = 0
    sample_in_epoch: int = 0
    samples_seen: int = 0
    ref_global_batch: int = 1
    world_size: int = 1
    batch_size: int = 1
    accumulate: int = 1

    @property
    def schedule_step(self) -> float:
        return self.samples_seen / self.ref_global_batch

    def advance(self, global_batch: int) -> None:
        """One optimizer step of ``global_batch`` samples."""
        self.step += 1
        self.sample_in_epoch += global_batch
        self.samples_seen += global_batch

    def next_epoch(self) -> None:
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "RunPosition":
        return cls(**{k: int(state[k]) for k in cls.__dataclass_fields__ if k in state})


def legacy_position(ckpt: dict, batch_size: int, world_size: int) -> RunPosition:
    """The position of a checkpoint written before positions were saved (its sampler counted batches per rank)."""
    g = batch_size * world_size
    return RunPosition(step=int(ckpt["step"]), epoch=int(ckpt["sampler"]["epoch"]),
                       sample_in_epoch=int(ckpt["sampler"]["start_batch"]) * g, samples_seen=int(ckpt["step"]) * g,
                       ref_global_batch=g, world_size=world_size, batch_size=batch_size)


def describe_layout_change(saved: RunPosition, world_size: int, batch_size: int, accumulate: int) -> str | None:
    """A warning naming both layouts when the run resumes with another global-batch layout, else None."""
    if (saved.world_size, saved.batch_size, saved.accumulate) == (world_size, batch_size, accumulate):
        return None
    g_old = saved.world_size * saved.batch_size * saved.accumulate
    g_new = world_size * batch_size * accumulate
    return (f"resuming a run saved with {saved.world_size} process(es) × batch {saved.batch_size}"
            f"{f' × {saved.accumulate} accumulated' if saved.accumulate > 1 else ''} (global {g_old}) on "
            f"{world_size} process(es) × batch {batch_size}{f' × {accumulate} accumulated' if accumulate > 1 else ''}"
            f" (global {g_new}): it continues at global sample {saved.sample_in_epoch} of epoch {saved.epoch}; the "
            f"learning-rate and freezing schedules follow the sample count (schedule step = samples / "
            f"{saved.ref_global_batch})")

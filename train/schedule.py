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


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is made: processes × per-process batch × accumulated micro-batches."""

    world_size: int
    batch_size: int
    accumulate: int = 1

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulate

    def __str__(self) -> str:
        accumulated = f" × {self.accumulate} accumulated" if self.accumulate > 1 else ""
        return f"{self.world_size} process(es) × batch {self.batch_size}{accumulated} (global {self.global_batch})"


def _int_fields(cls: type, state: dict) -> dict[str, int]:
    return {k: int(state[k]) for k in cls.__dataclass_fields__ if k in state}


@dataclass
class RunPosition:
    """Where a run stands: optimizer steps taken, epoch, global samples consumed in the epoch and in the run,
    and the reference global batch its schedule counts in (plus the layout that produced the position)."""

    step: int = 0
    epoch: int = 0
    sample_in_epoch: int = 0
    samples_seen: int = 0
    ref_global_batch: int = 1
    layout: BatchLayout = BatchLayout(1, 1)

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
        """The counters and the layout's fields, in one flat dict."""
        state = asdict(self)
        state.update(state.pop("layout"))
        return state

    @classmethod
    def from_state(cls, state: dict) -> "RunPosition":
        return cls(**_int_fields(cls, state), layout=BatchLayout(**_int_fields(BatchLayout, state)))


def legacy_position(ckpt: dict, batch_size: int, world_size: int) -> RunPosition:
    """The position of a checkpoint written before positions were saved (its sampler counted batches per rank)."""
    layout = BatchLayout(world_size, batch_size)
    g = layout.global_batch
    return RunPosition(step=int(ckpt["step"]), epoch=int(ckpt["sampler"]["epoch"]),
                       sample_in_epoch=int(ckpt["sampler"]["start_batch"]) * g, samples_seen=int(ckpt["step"]) * g,
                       ref_global_batch=g, layout=layout)


def describe_layout_change(saved: RunPosition, layout: BatchLayout) -> str | None:
    """A warning naming both layouts when the run resumes with another global-batch layout, else None."""
    if saved.layout == layout:
        return None
    return (f"resuming a run saved with {saved.layout} on {layout}: it continues at global sample "
            f"{saved.sample_in_epoch} of epoch {saved.epoch}; the learning-rate and freezing schedules follow the "
            f"sample count (schedule step = samples / {saved.ref_global_batch})")

"""Resumable batch samplers: a shuffling sampler and a P×K identity sampler, DDP-aware and world-size-safe.

Both yield batches of ``(dataset index, augmentation seed)`` pairs. An epoch is a fixed sequence of samples
(a pure function of ``(seed, epoch)``, held as two numpy arrays), cut into *global batches* of
``batch_size × world_size × accumulate`` samples: optimizer step k consumes samples
``[start + k·G, start + (k+1)·G)``, and rank r's micro-batch j of that step is the block
``u = j·world_size + r`` of ``batch_size`` samples in it. The state is the number of *global samples*
consumed in the epoch, so a run resumed on another number of processes (or with another accumulation)
continues at the same sample: nothing is repeated or skipped. The trainer saves the samples it has
*consumed* (workers prefetch ahead, so the sampler's own position is not it). A last partial global batch
is dropped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .schedule import BatchLayout

Batch = list[tuple[int, int]]


class _ResumableBatchSampler:
    def __init__(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, accumulate: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.accumulate = int(accumulate)
        self.epoch, self.start_sample = 0, 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.world_size, self.batch_size, self.accumulate)

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, seeds)`` of every sample of ``epoch`` in order (int64 arrays)."""
        if self._cache is None or self._cache[0] != epoch:
            idx, seeds = self._epoch_samples(epoch)
            self._cache = (epoch, idx, seeds)
        return self._cache[1], self._cache[2]

    def steps(self, epoch: int, start_sample: int = 0) -> int:
        """Optimizer steps of ``epoch`` from global sample ``start_sample`` on."""
        return max(0, (len(self.epoch_samples(epoch)[0]) - int(start_sample)) // self.global_batch)

    def batches(self, epoch: int, start_sample: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches of ``epoch`` from ``start_sample`` (in step order)."""
        idx, seeds = self.epoch_samples(epoch)
        b, w = self.batch_size, self.world_size
        for k in range(self.steps(epoch, start_sample)):
            base = int(start_sample) + k * self.global_batch
            for j in range(self.accumulate):
                a = base + (j * w + self.rank) * b
                yield list(zip(idx[a:a + b].tolist(), seeds[a:a + b].tolist()))

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Iterate epoch ``epoch`` from global sample ``start_sample`` on the next ``iter``."""
        self.epoch, self.start_sample = int(epoch), int(start_sample)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(self.epoch, self.start_sample)

    def __len__(self) -> int:
        """This rank's micro-batches left in the current epoch."""
        return self.steps(self.epoch, self.start_sample) * self.accumulate

    def steps_per_epoch(self) -> int:
        return self.steps(self.epoch)

    def state_dict(self, samples_consumed: int | None = None) -> dict:
        """State to resume at ``samples_consumed`` global samples into the current epoch (default: the start)."""
        start = self.start_sample if samples_consumed is None else int(samples_consumed)
        return {"seed": self.seed, "epoch": self.epoch, "start_sample": start, "kind": type(self).__name__,
                "world_size": self.world_size, "batch_size": self.batch_size, "accumulate": self.accumulate}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", type(self).__name__) != type(self).__name__:
            raise ValueError(f"sampler state is for {state['kind']}, this run uses {type(self).__name__}")
        self.seed = int(state["seed"])
        self._cache = None
        self.set_epoch(state["epoch"], state["start_sample"])


class ShuffleBatchSampler(_ResumableBatchSampler):
    """Each epoch a fresh permutation of all ``n`` samples."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 accumulate: int = 1):
        super().__init__(batch_size, seed, rank, world_size, accumulate)
        if n < self.global_batch:
            raise ValueError(f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} process(es)"
                             f"{f' × {accumulate} accumulated' if accumulate > 1 else ''}")
        self.n = int(n)

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 0x5F])
        order = rng.permutation(self.n)
        return order, rng.integers(0, 2**62, size=self.n)


class PKBatchSampler(_ResumableBatchSampler):
    """Batches of ``p`` identities × ``k`` images each (for batch-hard triplet / center losses).

    An epoch visits every image about once: each identity's images are shuffled and cut into chunks of
    ``k`` (the last chunk, or an identity with fewer than ``k`` images, is filled by sampling with
    replacement), chunks are interleaved at random and packed ``p`` distinct identities per batch.
    """

    def __init__(self, labels, p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 accumulate: int = 1):
        super().__init__(int(p) * int(k), seed, rank, world_size, accumulate)
        labels = np.asarray(labels, dtype=np.int64)
        self.p, self.k = int(p), int(k)
        if self.p < 1 or self.k < 1:
            raise ValueError(f"P and K must be ≥ 1, got P={p} K={k}")
        self.identities = np.unique(labels[labels >= 0])  # unlabelled samples (−1) have no identity to pack
        if len(self.identities) < self.p:
            raise ValueError(f"P={p} identities per batch but the data has only {len(self.identities)}")
        order = np.flatnonzero(labels >= 0)
        order = order[np.argsort(labels[order], kind="stable")]
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        self.members = np.split(order, bounds)

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's P×K batches laid end to end (each block of ``batch_size`` samples is one batch)."""
        batches = self._pk_batches(epoch)
        if not batches:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    def _pk_batches(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch, 0x9C])
        chunks: list[np.ndarray] = []
        keys: list[float] = []
        owner: list[int] = []
        for ident, m in enumerate(self.members):
            m = rng.permutation(m)
            n_chunks = max(1, int(round(len(m) / self.k)))
            need = n_chunks * self.k
            if need > len(m):
                m = np.concatenate([m, rng.choice(m, need - len(m), replace=True)])
            for j in range(n_chunks):
                chunks.append(m[j * self.k:(j + 1) * self.k])
                keys.append(j + rng.random())  # spreads one identity's chunks across the epoch
                owner.append(ident)
        batches: list[tuple[np.ndarray, np.ndarray]] = []
        current: list[int] = []
        taken: set[int] = set()
        deferred: list[int] = []
        for c in np.argsort(np.asarray(keys), kind="stable"):
            pending, deferred = deferred + [int(c)], []
            for cand in pending:
                if owner[cand] in taken:
                    deferred.append(cand)
                    continue
                current.append(cand)
                taken.add(owner[cand])
                if len(current) == self.p:
                    idx = np.concatenate([chunks[x] for x in current])
                    batches.append((idx.astype(np.int64), rng.integers(0, 2**62, size=len(idx))))
                    current, taken = [], set()
        return batches

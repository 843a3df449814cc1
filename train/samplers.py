"""Resumable batch samplers: a shuffling sampler and a P×K identity sampler, DDP-aware.

Both yield batches of ``(dataset index, augmentation seed)`` pairs. The order and the seeds of epoch ``e`` are
a pure function of ``(seed, e)``, so the state is just ``{seed, epoch, start_batch}``: the trainer saves the
number of batches it has *consumed* (workers prefetch ahead, so the sampler's own position is not it) and
:meth:`load_state_dict` skips those batches on resume. Under DDP each rank takes every ``world_size``-th
global batch (all ranks see the same number of batches).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

Batch = list[tuple[int, int]]


class _ResumableBatchSampler:
    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.start_batch = 0, 0
        self._cache: tuple[int, list[Batch]] | None = None

    def _global_batches(self, epoch: int) -> list[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, epoch: int) -> list[Batch]:
        """This rank's batches of ``epoch``."""
        if self._cache is None or self._cache[0] != epoch:
            g = self._global_batches(epoch)
            n = len(g) // self.world_size
            self._cache = (epoch, g[self.rank: n * self.world_size: self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from batch ``start_batch`` on the next ``iter``."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[Batch]:
        yield from self.batches(self.epoch)[self.start_batch:]

    def __len__(self) -> int:
        """Batches left in the current epoch (from ``start_batch``)."""
        return max(0, len(self.batches(self.epoch)) - self.start_batch)

    def batches_per_epoch(self) -> int:
        return len(self.batches(self.epoch))

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """State to resume at ``batches_consumed`` batches into the current epoch (default: ``start_batch``)."""
        start = self.start_batch if batches_consumed is None else int(batches_consumed)
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": start, "kind": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", type(self).__name__) != type(self).__name__:
            raise ValueError(f"sampler state is for {state['kind']}, this run uses {type(self).__name__}")
        self.seed = int(state["seed"])
        self._cache = None
        self.set_epoch(state["epoch"], state["start_batch"])


class ShuffleBatchSampler(_ResumableBatchSampler):
    """Each epoch a fresh permutation of all ``n`` samples, cut into batches (last partial batch dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if n < batch_size * world_size:
            raise ValueError(f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} process(es)")
        self.n, self.batch_size = int(n), int(batch_size)

    def _global_batches(self, epoch: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch, 0x5F])
        order = rng.permutation(self.n)
        seeds = rng.integers(0, 2**62, size=self.n)
        nb = self.n // self.batch_size
        return [[(int(order[j]), int(seeds[j])) for j in range(b * self.batch_size, (b + 1) * self.batch_size)]
                for b in range(nb)]


class PKBatchSampler(_ResumableBatchSampler):
    """Batches of ``p`` identities × ``k`` images each (for batch-hard triplet / center losses).

    An epoch visits every image about once: each identity's images are shuffled and cut into chunks of
    ``k`` (the last chunk, or an identity with fewer than ``k`` images, is filled by sampling with
    replacement), chunks are interleaved at random and packed ``p`` distinct identities per batch.
    """

    def __init__(self, labels, p: int, k: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
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

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def _global_batches(self, epoch: int) -> list[Batch]:
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
        batches: list[Batch] = []
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
                    seeds = rng.integers(0, 2**62, size=len(idx))
                    batches.append([(int(i), int(s)) for i, s in zip(idx, seeds)])
                    current, taken = [], set()
        return batches

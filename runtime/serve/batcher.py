"""Micro-batching: aligned face crops from concurrent requests go through the recognizer together.

Each request submits its crops (one array, N×H×W×3) and gets a future of its N embeddings. One worker
thread takes the oldest submission, waits at most ``max_wait_s`` for more (or until ``max_batch`` crops
are queued, or at once when ``more_coming()`` says no other request is on its way), and embeds the whole
batch in one call. A request's crops are never split across calls;
one larger than ``max_batch`` runs alone (the embed function chunks it). Each crop's embedding does not
depend on its batch-mates, so a request's answer is the one it would get alone.

When nothing is queued or running, :meth:`MicroBatcher.run_inline` embeds in the caller's thread instead
(there is nothing to batch with, and it saves two thread hand-offs).

Bounded: at most ``max_queue`` crops wait; past that :meth:`MicroBatcher.submit` raises
:class:`QueueFull`. A submission whose deadline has passed before its batch starts is dropped with
:class:`TimeoutError` instead of being computed for nobody.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np


class QueueFull(RuntimeError):
    """More crops wait for the recognizer than the queue allows."""


@dataclass
class _Item:
    crops: np.ndarray
    future: Future
    deadline: float | None
    queued_at: float


class MicroBatcher:
    """Batches ``embed(crops) -> N×D`` calls across threads (see the module docstring).

    ``on_batch(faces, seconds)`` is called after each recognizer call and ``on_depth(crops_waiting)`` when
    the queue changes (for metrics). ``more_coming()`` (default: always true) tells whether waiting can
    help, e.g. whether other requests are still being detected.
    """

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 512, on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, more_coming: Callable[[], bool] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be ≥ 1 and max_wait_s ≥ 0")
        self._embed = embed
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self._on_batch = on_batch or (lambda n, s: None)
        self._on_depth = on_depth or (lambda n: None)
        self._more_coming = more_coming or (lambda: True)
        self._queue: collections.deque[_Item] = collections.deque()
        self._waiting = 0  # crops in the queue
        self._running = 0  # recognizer calls under way
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="facekit-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Crops waiting for the recognizer."""
        return self._waiting

    def idle(self) -> bool:
        """Nothing queued and no recognizer call under way."""
        return not self._queue and not self._running

    def run_inline(self, crops: np.ndarray) -> np.ndarray:
        """Embed ``crops`` now, in this thread (for a caller that found the batcher :meth:`idle`)."""
        with self._cv:
            self._running += 1
        try:
            t0 = time.perf_counter()
            emb = self._embed(crops)
            self._on_batch(len(crops), time.perf_counter() - t0)
            return emb
        finally:
            with self._cv:
                self._running -= 1

    def submit(self, crops: np.ndarray, deadline: float | None = None) -> Future:
        """Queue ``crops`` (N×H×W×3 uint8, N ≥ 1); the future's result is their N×D embeddings.
        ``deadline`` is a :func:`time.monotonic` time after which the work is no longer wanted."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or len(crops) == 0:
            raise ValueError(f"expected N×H×W×3 crops with N ≥ 1, got shape {crops.shape}")
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            if self._waiting and self._waiting + len(crops) > self.max_queue:
                raise QueueFull(f"{self._waiting} faces are waiting for the recognizer (limit {self.max_queue})")
            self._queue.append(_Item(crops, fut, deadline, time.monotonic()))
            self._waiting += len(crops)
            depth = self._waiting
            self._cv.notify()
        self._on_depth(depth)
        return fut

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what is queued, then stop the worker thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------- worker

    def _take_batch(self) -> list[_Item] | None:
        """The next batch (oldest first, whole submissions, ≤ max_batch crops unless one is larger);
        None once stopping with nothing queued."""
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            until = self._queue[0].queued_at + self.max_wait_s
            while self._waiting < self.max_batch and not self._stopping and self._more_coming():
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, total = [], 0
            while self._queue and (not batch or total + len(self._queue[0].crops) <= self.max_batch):
                item = self._queue.popleft()
                batch.append(item)
                total += len(item.crops)
            self._waiting -= total
            depth = self._waiting
        self._on_depth(depth)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if not item.future.set_running_or_notify_cancel():
                    continue  # the request went away
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(TimeoutError("the request's time budget ran out before embedding"))
                    continue
                live.append(item)
            if live:
                self._embed_batch(live)

    def _embed_batch(self, items: list[_Item]) -> None:
        crops = items[0].crops if len(items) == 1 else np.concatenate([i.crops for i in items])
        t0 = time.perf_counter()
        with self._cv:
            self._running += 1
        try:
            emb = self._embed(crops)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting request
            for item in items:
                item.future.set_exception(e)
            return
        finally:
            with self._cv:
                self._running -= 1
        self._on_batch(len(crops), time.perf_counter() - t0)
        start = 0
        for item in items:
            n = len(item.crops)
            item.future.set_result(emb[start:start + n])
            start += n

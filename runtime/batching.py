"""Ordered batch mapping with bounded read-ahead: prepare items in a thread pool, process them in batches on
the calling thread, yield one result per item in input order.

Memory stays bounded on an endless iterator: at most ``window`` items are taken from the input and not yet
yielded (being prepared, waiting in order, or in the batch being filled). A batch is closed when the
``weight`` of its items reaches ``batch_size``, when it holds ``window`` items, or when the input ends, so
its composition depends on the input only, never on timing.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")


def _run_inline(fn: Callable[[T], P], item: T) -> Future:
    """A finished future holding ``fn(item)`` (or its exception), computed on this thread."""
    future: Future = Future()
    try:
        future.set_result(fn(item))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer through the future
        future.set_exception(e)
    return future


def ordered_batches(items: Iterable[T], prepare: Callable[[T], P], process: Callable[[list[P]], Sequence[R]],
                    *, weight: Callable[[P], int], batch_size: int, workers: int, window: int) -> Iterator[R]:
    """``process(batch)`` over batches of ``prepare(item)``, flattened, in input order.

    ``prepare`` runs in ``workers`` threads (0: on the calling thread); ``process`` runs on the calling
    thread and returns one result per prepared item. An exception from either propagates; items already
    queued are then cancelled, and so they are when the consumer stops iterating.
    """
    if batch_size < 1 or window < 1 or workers < 0:
        raise ValueError(f"need batch_size ≥ 1, window ≥ 1 and workers ≥ 0, got {batch_size}, {window}, {workers}")
    source = iter(items)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare") if workers else None
    pending: deque[Future] = deque()
    batch: list[P] = []
    load = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) + len(batch) < window:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(prepare, item) if pool else _run_inline(prepare, item))
            if pending:
                prepared = pending.popleft().result()
                batch.append(prepared)
                load += weight(prepared)
            if batch and (load >= batch_size or len(batch) >= window or (exhausted and not pending)):
                results = process(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
                batch, load = [], 0
                yield from results
            elif exhausted and not pending:
                return
    finally:
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["ordered_batches"]

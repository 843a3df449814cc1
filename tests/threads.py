"""Run one function on several threads and report the first failure (shared by the thread-safety tests)."""
from __future__ import annotations

import threading
from typing import Callable


def run_threads(work: Callable[[int], None], count: int, timeout: float = 300.0) -> None:
    """``work(k)`` for ``k`` in ``range(count)``, each on its own thread; re-raises the first exception a
    thread raised and fails when a thread is still running after ``timeout`` seconds."""
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"a thread still ran after {timeout} s"

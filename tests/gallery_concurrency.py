"""Enrol people while other threads identify them: the check both gallery test modules run (not a test module)."""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import pytest

from runtime.gallery import Gallery
from threads import run_threads


def enrol_while_identifying(g: Gallery, vecs: np.ndarray, churn: Callable[[int], None] | None = None,
                            readers: int = 3) -> None:
    """Enrol ``p{i}`` with ``vecs[i]`` (people × rows × dim) one by one; every 10th person, also enrol and remove a
    temporary person and call ``churn(i)``. Readers meanwhile identify enrolled people's rows and must always see
    whole people: their own row at similarity 1, all their rows, no name twice in a top 5."""
    n_people, per_person = vecs.shape[:2]
    done = [0]  # people whose enroll() has returned
    errors: list[BaseException] = []
    stop = threading.Event()

    def enroller():
        try:
            for i in range(n_people):
                g.enroll(f"p{i}", vecs[i])
                done[0] = i + 1
                if i % 10 == 9:
                    g.enroll("tmp", vecs[i])
                    g.remove("tmp")
                    if churn:
                        churn(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                n = done[0]
                if n == 0:
                    continue
                i, j = int(r.integers(0, n)), int(r.integers(0, per_person))
                (name, sim), = g.identify(vecs[i, j])
                assert name in (f"p{i}", "tmp") and sim == pytest.approx(1.0, abs=1e-5), (i, name, sim)
                rows = g.embeddings(f"p{i}").shape
                assert rows == vecs.shape[1:], (i, rows)  # all rows or nothing
                top = [nm for nm, _ in g.identify(vecs[i, j], top_k=5, threshold=-1.0)]
                # at least the n people enrolled before the query; len(g) read now may already count more
                assert len(set(top)) == len(top) and min(5, n) <= len(top) <= 5, (n, top)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    run_threads(lambda k: enroller() if k == 0 else reader(k - 1), readers + 1, timeout=120)
    assert not errors, errors[0]

"""Helper process for test_gallery's kill test (not a test module).

Run as ``python tests/gallery_kill_writer.py``: it imports everything once, then serves commands on stdin
(one per line) so that each round costs a fork, not a Python start-up:

* ``go PATH START`` — fork a writer that saves gallery versions START, START+1, ... to PATH forever;
  reply with its pid (the test SIGKILLs it);
* ``goindex PATH START`` — the same for a gallery with an HNSW index (saved beside it as ``PATH.index``):
  version ``v`` is :func:`index_base` plus the person ``extra`` with :func:`extra_vector` ``(v)``;
* ``reap PID`` — wait for that writer and reply with its wait status;
* ``quit``.

:func:`make_version` builds version ``v`` deterministically, so the test can check a loaded file is
exactly one complete version. Run it with ``OMP_NUM_THREADS=1``: faiss must not start OpenMP threads in
the process that forks.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.gallery import Gallery  # noqa: E402

ROWS, DIM = 1200, 256  # ~1.2 MB of embeddings: a save takes long enough for kills to land inside it


def base_embeddings() -> np.ndarray:
    x = np.random.default_rng(1234).standard_normal((ROWS, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_version(v: int, base: np.ndarray) -> Gallery:
    """Gallery version ``v``: 1..5 people splitting rolled rows; the threshold encodes ``v``."""
    g = Gallery(threshold=v / 1000.0)
    people = 1 + v % 5
    rows = np.roll(base, v, axis=0)
    for i, block in enumerate(np.array_split(rows[: ROWS - (v % 7)], people)):
        g.enroll(f"person{i}-é✓", block)
    return g


INDEX_ROWS, INDEX_DIM = 1500, 128


def index_rows() -> np.ndarray:
    """Rows of the indexed gallery: clustered like face embeddings (a common direction plus noise)."""
    rng = np.random.default_rng(99)
    x = rng.standard_normal(INDEX_DIM) * 3 + rng.standard_normal((INDEX_ROWS, INDEX_DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def extra_vector(v: int) -> np.ndarray:
    x = index_rows()[v % INDEX_ROWS] + 0.3 * np.random.default_rng(v).standard_normal(INDEX_DIM)
    return (x / np.linalg.norm(x)).astype(np.float32)


def index_base() -> Gallery:
    """One person per row (``b0``, ``b1``, …), searched with an HNSW index."""
    g = Gallery(threshold=0.0, index="hnsw")
    g.enroll_many([f"b{i}" for i in range(INDEX_ROWS)], index_rows())
    return g


def set_index_version(g: Gallery, v: int) -> Gallery:
    """Make ``g`` (an :func:`index_base`, perhaps with an older version) version ``v``."""
    if "extra" in g:
        g.remove("extra")
    g.enroll("extra", extra_vector(v))
    g.threshold = v / 1000.0
    return g


def _save_versions(path: str, start: int, version: Callable[[int], Gallery]) -> None:
    """Save ``version(start)``, ``version(start + 1)``, … to ``path`` until killed."""
    for v in itertools.count(start):
        version(v).save(path)


def kill_rounds(rounds: int, kill_one: Callable[[int], bool], loaded_version: Callable[[], int]) -> tuple[int, int]:
    """``rounds`` times: ``kill_one(next_version)`` starts a writer and SIGKILLs it (True when the kill left a
    temporary file, i.e. struck mid-write), then ``loaded_version()`` must load one complete version, never
    an older one than before. Returns (the last version seen, kills that struck mid-write); fails when no
    save ever completed or no kill struck mid-write (the rounds would then have tested nothing)."""
    last, mid_write = 0, 0
    for round_ in range(rounds):
        mid_write += bool(kill_one(last + 1))
        v = loaded_version()
        assert v == 0 or v >= last, f"round {round_}: went back from version {last} to {v}"
        last = max(last, v)
    assert last > 0, "no writer ever completed a save: the test did not exercise replacing"
    assert mid_write > 0, "no kill landed during a write: the test did not exercise anything"
    return last, mid_write


class Zygote:
    """This script as a process, seen from a test: fork a writer, SIGKILL it after a delay, reap it."""

    def __init__(self):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def kill_writer(self, command: str, path: Path, start: int, delay_s: float) -> int:
        """Start a ``command`` ("go" / "goindex") writer, SIGKILL it ``delay_s`` later; returns its pid."""
        pid = self._ask(f"{command} {path} {start}")
        time.sleep(delay_s)
        os.kill(pid, signal.SIGKILL)
        status = self._ask(f"reap {pid}")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"writer {pid}: status {status}"
        return pid

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def main() -> None:
    base = base_embeddings()
    indexed = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] in ("go", "goindex"):
            if cmd[0] == "goindex":
                indexed = indexed or index_base()
            pid = os.fork()
            if pid == 0:
                try:
                    if cmd[0] == "go":
                        _save_versions(cmd[1], int(cmd[2]), lambda v: make_version(v, base))
                    else:
                        _save_versions(cmd[1], int(cmd[2]), lambda v: set_index_version(indexed, v))
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            print(status, flush=True)
        elif cmd[0] == "quit":
            break


if __name__ == "__main__":
    main()

"""Helper process for test_gallery's kill test (not a test module).

Run as ``python tests/gallery_kill_writer.py``: it imports everything once, then serves commands on stdin
(one per line) so that each round costs a fork, not a Python start-up:

* ``go PATH START`` — fork a writer that saves gallery versions START, START+1, ... to PATH forever;
  reply with its pid (the test SIGKILLs it);
* ``reap PID`` — wait for that writer and reply with its wait status;
* ``quit``.

:func:`make_version` builds version ``v`` deterministically, so the test can check a loaded file is
exactly one complete version.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

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


def _writer(path: str, start: int, base: np.ndarray) -> None:
    v = start
    while True:
        make_version(v, base).save(path)
        v += 1


def main() -> None:
    base = base_embeddings()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "go":
            pid = os.fork()
            if pid == 0:
                try:
                    _writer(cmd[1], int(cmd[2]), base)
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

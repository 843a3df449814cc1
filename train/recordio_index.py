"""The index of an insightface RecordIO dataset in numpy arrays, with a binary sidecar so it is parsed once.

A ``train.idx`` of 5.8 M ``key<TAB>offset`` lines (MS1MV2) becomes two int64 arrays (47 MB each) instead of
Python dicts of ints (≈ 1.5 GB per process). The parsed arrays and the image labels (read from the identity
records) are saved once as ``.npy`` sidecars next to the ``.idx`` (or under ``$FACEKIT_CACHE/recordio`` when
that folder is read-only), named after the ``.idx`` / ``.rec`` sizes and modification times; later opens —
every rank of every run — memory-map them (pages shared between processes through the page cache).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from evaluation.crops import cache_dir
from runtime.files import atomic_write

SIDECAR_SUFFIX = ".facekit.npy"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def sidecar_path(kind: str, idx_path: Path, rec_path: Path) -> Path:
    """Where the ``kind`` sidecar of this dataset lives (next to the .idx when that folder is writable)."""
    name = f".{idx_path.name}.{kind}.{_stamp(idx_path)}.{_stamp(rec_path)}{SIDECAR_SUFFIX}"
    if os.access(idx_path.parent, os.W_OK):
        return idx_path.parent / name
    digest = hashlib.sha1(str(idx_path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "recordio" / f"{digest}{name}"


def cached_array(kind: str, idx_path: Path, rec_path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The ``kind`` array of this dataset: memory-mapped from its sidecar, or built, saved and returned."""
    path = sidecar_path(kind, idx_path, rec_path)
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            pass  # unreadable sidecar: build it again
    arr = build()
    try:
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
        for old in path.parent.glob(f".{idx_path.name}.{kind}.*{SIDECAR_SUFFIX}"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        return np.ascontiguousarray(arr)  # no place to keep it: parse again next time
    arr = None  # the parse buffers go; the sidecar's pages are shared with every process that maps it
    return np.load(path, mmap_mode="r", allow_pickle=False)


def parse_idx(idx_path: Path) -> np.ndarray:
    """2×N int64 ``[keys, offsets]`` of a ``key<TAB>offset`` file, sorted by key (a transposed view of the parsed
    N×2 table); duplicate keys are an error."""
    try:
        table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as e:
        raise ValueError(f"{idx_path}: expected 'key offset' lines of integers ({e})") from None
    if table.size == 0:
        return np.zeros((2, 0), np.int64)
    if table.shape[1] != 2:
        raise ValueError(f"{idx_path}: expected 'key offset' lines, got {table.shape[1]} fields")
    keys = table[:, 0]
    if (keys[1:] > keys[:-1]).all():  # the usual case: a view, no copy of millions of rows
        return table.T
    table = table[np.argsort(keys, kind="stable")]
    keys = table[:, 0]
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dup):
        raise ValueError(f"{idx_path}: key {keys[dup[0]]} appears more than once")
    return table.T


class RecordIndex:
    """Sorted keys and their byte offsets; :meth:`offset` looks one up (directly when keys are 0..N−1)."""

    def __init__(self, table: np.ndarray, source: Path):
        self.keys, self.offsets, self.source = table[0], table[1], source
        n = len(self.keys)
        self.sequential = n > 0 and int(self.keys[0]) == 0 and int(self.keys[-1]) == n - 1

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Positions of ``keys`` in the index; KeyError naming the first absent key."""
        keys = np.asarray(keys, np.int64)
        if self.sequential:
            pos = keys
            bad = (keys < 0) | (keys >= len(self.keys))
        else:
            pos = np.searchsorted(self.keys, keys).clip(0, max(0, len(self.keys) - 1))
            bad = self.keys[pos] != keys if len(self.keys) else np.ones(len(keys), bool)
        if bad.any():
            raise KeyError(f"{self.source}: no record with key {int(keys[np.flatnonzero(bad)[0]])}")
        return pos

    def offset(self, key: int) -> int:
        return int(self.offsets[self.positions(np.array([key]))[0]])

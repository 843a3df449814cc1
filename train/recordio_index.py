"""The index of an insightface RecordIO dataset in numpy arrays, with a binary sidecar so it is parsed once.

A ``train.idx`` of 5.8 M ``key<TAB>offset`` lines (MS1MV2) becomes one int64 array of offsets (47 MB; keys
are kept too when they are not 0..N−1) instead of Python dicts of ints (≈ 1.5 GB per process). The parsed
index, and image labels that had to be read from each image's header, are saved once as ``.npy`` sidecars
next to the ``.idx`` (or under ``$FACEKIT_CACHE/recordio`` when that folder is read-only), named after the
``.idx`` / ``.rec`` sizes and modification times; later opens — every rank of every run — memory-map them
(pages shared between processes through the page cache).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import BinaryIO, Callable

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


def cached_array(kind: str, idx_path: Path, rec_path: Path, build: Callable[[], np.ndarray | list[np.ndarray]],
                 release: Callable[[], None] | None = None) -> np.ndarray:
    """The ``kind`` array of this dataset: memory-mapped from its sidecar, or built, saved and returned.

    ``build`` returns the array, or a list of 1-D parts that make it when concatenated (saved without a copy);
    ``release`` is called once they are dropped (e.g. to hand their allocator's freed memory back)."""
    path = sidecar_path(kind, idx_path, rec_path)
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            pass  # unreadable sidecar: build it again
    built = build()
    parts = built if isinstance(built, list) else [built]
    kept = None
    try:
        atomic_write(path, lambda f: _save_parts(f, parts))
        for old in path.parent.glob(f".{idx_path.name}.{kind}.*{SIDECAR_SUFFIX}"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:  # no place to keep it: parse again next time
        kept = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
    built = parts = None  # the built buffers go; the sidecar's pages are shared with every process that maps it
    if release is not None:
        release()
    return kept if kept is not None else np.load(path, mmap_mode="r", allow_pickle=False)


def _save_parts(f: BinaryIO, parts: list[np.ndarray]) -> None:
    """One ``.npy`` array: the single part as it is, or 1-D parts one after another."""
    if len(parts) == 1:
        np.save(f, parts[0], allow_pickle=False)
        return
    header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False,
              "shape": (sum(len(p) for p in parts),)}
    np.lib.format.write_array_header_1_0(f, header)
    for part in parts:
        f.write(memoryview(np.ascontiguousarray(part, parts[0].dtype)))


def parse_idx(idx_path: Path) -> np.ndarray | list[np.ndarray]:
    """The index of a ``key<TAB>offset`` file. When the keys are 0..N−1 in order (the insightface layout),
    only the offsets, as a list of 1-D int64 parts (views of the parser's buffers); else the 2×N
    ``[keys, offsets]`` table sorted by key. Duplicate keys are an error.

    Tab-separated files are read by pyarrow's multi-threaded CSV reader (5.9 M lines in ≈ 0.4 s on two
    cores); other whitespace falls back to ``np.loadtxt``."""
    if idx_path.stat().st_size == 0:
        return np.zeros((2, 0), np.int64)
    try:
        keys, offsets = _read_tab_separated(idx_path)
    except ValueError:
        keys, offsets = _read_whitespace_separated(idx_path)
    if keys is None:
        return offsets
    offsets = np.concatenate(offsets)
    if (keys[1:] > keys[:-1]).all():
        return np.stack([keys, offsets])
    order = np.argsort(keys, kind="stable")
    keys, offsets = keys[order], offsets[order]
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dup):
        raise ValueError(f"{idx_path}: key {keys[dup[0]]} appears more than once")
    return np.stack([keys, offsets])


def _read_tab_separated(idx_path: Path) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """``(keys, offset parts)``, keys None when they are 0..N−1 in order; ValueError if the lines are not two
    tab-separated integers."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        columns = {"key": pa.int64(), "offset": pa.int64()}
        table = pcsv.read_csv(idx_path, read_options=pcsv.ReadOptions(column_names=list(columns)),
                              parse_options=pcsv.ParseOptions(delimiter="\t"), memory_pool=_parser_pool(),
                              convert_options=pcsv.ConvertOptions(column_types=columns))
    except pa.ArrowInvalid as e:
        raise ValueError(str(e)) from None
    if table.column("key").null_count or table.column("offset").null_count:
        raise ValueError(f"{idx_path}: a line lacks its key or offset")
    key_parts = _int64_views(table.column("key"))
    return (None if _counts_from_zero(key_parts) else np.concatenate(key_parts)), _int64_views(table.column("offset"))


def _counts_from_zero(parts: list[np.ndarray]) -> bool:
    """Whether the keys, in 1-D parts one after another, are 0, 1, 2, … N−1."""
    start = 0
    for part in parts:
        if not len(part) or int(part[0]) != start or not (np.diff(part) == 1).all():
            return False
        start += len(part)
    return True


def _parser_pool():
    import pyarrow as pa

    try:
        return pa.mimalloc_memory_pool()  # returns freed memory to the system on request, unlike jemalloc
    except NotImplementedError:
        return pa.default_memory_pool()


def release_parser_memory() -> None:
    """Hand the CSV parser's freed buffers back to the system (its allocator keeps them for reuse)."""
    if "pyarrow" in sys.modules:
        _parser_pool().release_unused()


def _int64_views(column) -> list[np.ndarray]:
    """Zero-copy numpy views of an int64 arrow column's chunks (``to_numpy`` would import pandas)."""
    return [np.frombuffer(c.buffers()[1], np.int64, len(c), c.offset * 8) for c in column.chunks]


def _read_whitespace_separated(idx_path: Path) -> tuple[np.ndarray | None, list[np.ndarray]]:
    try:
        table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as e:
        raise ValueError(f"{idx_path}: expected 'key offset' lines of integers ({e})") from None
    if table.size == 0:
        return None, [np.zeros(0, np.int64)]
    if table.shape[1] != 2:
        raise ValueError(f"{idx_path}: expected 'key offset' lines, got {table.shape[1]} fields")
    keys = table[:, 0]
    return (None if _counts_from_zero([keys]) else keys.copy()), [table[:, 1].copy()]


class RecordIndex:
    """Sorted keys and their byte offsets; :meth:`offset` looks one up (directly when keys are 0..N−1).

    ``table`` is what :func:`parse_idx` returns: offsets alone (keys 0..N−1) or ``[keys, offsets]``."""

    def __init__(self, table: np.ndarray, source: Path):
        self.source = source
        if table.ndim == 1:
            self.offsets, self._keys = table, None
        else:
            self._keys, self.offsets = table[0], table[1]
        n = len(self.offsets)
        self.sequential = self._keys is None or (n > 0 and int(self._keys[0]) == 0 and int(self._keys[-1]) == n - 1)

    @property
    def keys(self) -> np.ndarray:
        """Every key, sorted (made on first use when the keys are 0..N−1)."""
        if self._keys is None:
            self._keys = np.arange(len(self.offsets), dtype=np.int64)
        return self._keys

    @property
    def first_key(self) -> int:
        return 0 if self._keys is None else int(self._keys[0])

    def __len__(self) -> int:
        return len(self.offsets)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Positions of ``keys`` in the index; KeyError naming the first absent key."""
        keys = np.asarray(keys, np.int64)
        if self.sequential:
            pos = keys
            bad = (keys < 0) | (keys >= len(self.offsets))
        else:
            pos = np.searchsorted(self.keys, keys).clip(0, max(0, len(self.keys) - 1))
            bad = self.keys[pos] != keys if len(self.keys) else np.ones(len(keys), bool)
        if bad.any():
            raise KeyError(f"{self.source}: no record with key {int(keys[np.flatnonzero(bad)[0]])}")
        return pos

    def offset(self, key: int) -> int:
        return int(self.offsets[self.positions(np.array([key]))[0]])

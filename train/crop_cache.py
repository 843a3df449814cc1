"""In-memory caches of a dataset's crops (``data.cache``) and the check that they fit on this machine.

``decoded`` keeps every crop as uint8 in one array (37 KB per 112×112 crop), ``encoded`` the file bytes in
one buffer with an offset table (no Python object per sample, so forked DataLoader workers share the pages
copy-on-write instead of copying them as reference counts change), ``none`` reads from disk each time.
``auto`` is ``none`` for RecordIO data (MS1M-sized sets: the page cache does the rest) and ``decoded``
otherwise when it fits (else ``encoded``, else ``none``, with a warning).

Every process of a job holds its own cache, so the check counts the processes on this machine
(``LOCAL_WORLD_SIZE``): 8 ranks decoding MS1MV2 need 8 × 204 GiB, not 204 GiB.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

#: A cache may use at most this fraction of the memory available when it is built.
MAX_FRACTION = 0.6
CACHE_MODES = ("auto", "decoded", "encoded", "none")


class CacheTooLarge(ValueError):
    """The requested cache does not fit in this machine's available memory."""


def available_memory() -> int:
    """Bytes the kernel could give without swapping (``MemAvailable``; free pages where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_fits(mode: str, per_process: int, processes: int, samples: int) -> None:
    """:class:`CacheTooLarge` naming the sizes when ``processes`` caches of ``per_process`` bytes do not fit."""
    need, avail = per_process * processes, available_memory()
    if need > MAX_FRACTION * avail:
        who = f" × {processes} processes on this machine" if processes > 1 else ""
        raise CacheTooLarge(f"data.cache={mode} needs {need / 2**30:.1f} GiB ({samples} crops, "
                            f"{per_process / 2**30:.2f} GiB per process{who}) but only {avail / 2**30:.1f} GiB "
                            f"are available; use data.cache: encoded or none")


def resolve_cache(mode: str, data_format: str, decoded_bytes: int, encoded_bytes: Callable[[], int], processes: int,
                  samples: int) -> str:
    """The cache mode to use: ``auto`` resolved (see the module docstring), explicit modes checked."""
    if mode not in CACHE_MODES:
        raise ValueError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "none" or (mode == "auto" and data_format == "rec"):
        return "none"
    if mode != "auto":
        check_fits(mode, decoded_bytes if mode == "decoded" else encoded_bytes(), processes, samples)
        return mode
    for candidate in ("decoded", "encoded"):
        try:
            check_fits(candidate, decoded_bytes if candidate == "decoded" else encoded_bytes(), processes, samples)
            return candidate
        except CacheTooLarge as e:
            reason = str(e)
    warnings.warn(f"data.cache=auto: no cache ({reason})", stacklevel=3)
    return "none"


def fill_decoded(n: int, shape: tuple[int, int, int], read: Callable[[int], np.ndarray], threads: int,
                 progress: bool) -> np.ndarray:
    """n×H×W×3 uint8 array of ``read(i)`` for every sample (decoded by ``threads`` threads)."""
    out = np.empty((n, *shape), np.uint8)

    def work(i: int) -> None:
        out[i] = read(i)

    from tqdm import tqdm
    with ThreadPoolExecutor(max(1, threads)) as ex:
        for _ in tqdm(ex.map(work, range(n)), total=n, desc="caching crops", disable=not progress, leave=False,
                      mininterval=1.0):
            pass
    return out


class EncodedCache:
    """Every sample's encoded bytes in one uint8 buffer plus an (n+1) offset table."""

    def __init__(self, n: int, read_bytes: Callable[[int], bytes]):
        chunks = [read_bytes(i) for i in range(n)]
        self.offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(c) for c in chunks], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(chunks), np.uint8)

    def __getitem__(self, i: int) -> bytes:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes()

"""What the CPU offers this process: usable cores, the model name, and instruction-set flags."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is no such file)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            out[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` model name, else ``platform.processor()``)."""
    name = _cpuinfo().get("model name")
    return " ".join(name.split()) if name else (platform.processor() or platform.machine() or "unknown CPU")


def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of the CPU (``avx2``, ``avx512_bf16``, ``amx_bf16``, …); empty when unknown."""
    return frozenset(_cpuinfo().get("flags", "").split())

"""What the CPU offers this process: usable cores, the model name, and instruction-set flags."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Iterable


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


#: The instruction sets that decide CPU inference speed, each with the CPU flags that show it (any one).
ISA_FLAGS: dict[str, frozenset[str]] = {
    "AVX2": frozenset({"avx2"}),
    "AVX-512": frozenset({"avx512f"}),
    "VNNI": frozenset({"avx512_vnni", "avx_vnni", "avx512vnni"}),  # int8 dot products (512- or 256-bit)
    "AMX": frozenset({"amx_tile"}),
    "AMX-BF16": frozenset({"amx_bf16"}),
    "AMX-INT8": frozenset({"amx_int8"}),
    "AVX512-BF16": frozenset({"avx512_bf16"}),
}


def has_isa(name: str, flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU (or the given ``flags``) has the instruction set ``name`` of :data:`ISA_FLAGS`."""
    return bool(ISA_FLAGS[name] & (cpu_flags() if flags is None else flags))


def first_isa(names: Iterable[str], flags: frozenset[str] | None = None) -> str | None:
    """The first of ``names`` (instruction sets of :data:`ISA_FLAGS`, best first) the CPU or ``flags`` has."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name in names if has_isa(name, flags)), None)

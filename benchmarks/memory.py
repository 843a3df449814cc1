"""Process memory as Linux reports it in ``/proc/<pid>/status``, in MiB (benchmarks and tests read it here)."""
from __future__ import annotations

from pathlib import Path


def status_mib(field: str, pid: int | str = "self") -> float:
    """``field`` of process ``pid``'s status in MiB: ``VmRSS`` (resident now), ``VmHWM`` (peak resident), …;
    NaN where there is no such file or field (not Linux, process gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0]) / 1024
    except OSError:
        pass
    return float("nan")

"""Progress bars for long runtime work: tqdm on stderr where it is installed and wanted, else a no-op."""
from __future__ import annotations

import contextlib
import sys
from typing import Any


class _NoBar(contextlib.nullcontext):
    """Stands in for a tqdm bar: ``update`` does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self


def progress_bar(total: int, *, desc: str, unit: str = "img", initial: int = 0, enabled: bool | None = None) -> Any:
    """A tqdm bar on stderr when ``enabled`` (None: when stderr is a terminal) and tqdm is installed (it is
    optional for the runtime), else a no-op; either is a context manager with ``update(n)``."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, smoothing=0.1)

"""The environment a benchmark's child Python runs in: this checkout first on its import path."""
from __future__ import annotations

import os

from evaluation.data import PROJECT_ROOT


def child_env(*paths: str | os.PathLike, **variables: str) -> dict[str, str]:
    """This process's environment plus ``variables``, with ``PYTHONPATH`` = this checkout, then ``paths``, then
    the caller's own entries (kept, not replaced)."""
    entries = [str(PROJECT_ROOT), *map(os.fspath, paths), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return {**os.environ, **variables, "PYTHONPATH": os.pathsep.join(e for e in entries if e)}

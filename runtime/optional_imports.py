"""Optional dependencies, imported on first use: the module, or the caller's error saying how to install it."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable


def require_module(name: str, error: Callable[[str], Exception], hint: str) -> ModuleType:
    """``import name`` (dotted names allowed); when it cannot be imported raise ``error(hint)``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise error(hint) from None


def importable(name: str) -> bool:
    """Whether ``import name`` works here (a broken install counts as absent)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True

"""Which files hold PyTorch checkpoints, decided by their names alone, so that torch-free code can ask."""
from __future__ import annotations

import os
from pathlib import Path

#: File suffixes of PyTorch checkpoints (compared case-insensitively).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path``'s suffix is a PyTorch checkpoint's (:data:`CHECKPOINT_SUFFIXES`)."""
    return Path(path).suffix.lower() in CHECKPOINT_SUFFIXES

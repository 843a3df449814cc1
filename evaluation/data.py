"""Where the research data lives: ``$FACEKIT_DATA``, else ``../shared/data`` beside the project folder."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$FACEKIT_DATA``, defaulting to ``../shared/data`` next to the project (absolute)."""
    return Path(os.environ.get("FACEKIT_DATA") or PROJECT_ROOT.parent / "shared" / "data").resolve()

"""Shared fixtures: the research data folder ($FACEKIT_DATA) and small helpers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.data import data_root

pytest.register_assert_rewrite("gallery_concurrency", "threads")  # shared checks explain their failures too

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """$FACEKIT_DATA, defaulting to ../shared/data next to the project."""
    return data_root()


@pytest.fixture(scope="session")
def facekit_data() -> Path:
    """The data folder; tests that need it skip when it is absent."""
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"FACEKIT_DATA not found at {d}; set $FACEKIT_DATA to the shared data folder")
    return d


@pytest.fixture(scope="module")
def pipe():
    """A :class:`runtime.pipeline.FacePipeline` with the shipped models, shared by one test module."""
    from runtime.pipeline import FacePipeline

    return FacePipeline()


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter at the project root, output captured as text; fails the
    calling test (showing the output) unless it exits 0."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def need(path: Path) -> Path:
    """Skip the calling test unless ``path`` exists."""
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def cosine(a, b) -> float:
    """Cosine of two vectors, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def link_faces(src: Path, dst: Path, count: int, start: int = 0) -> Path:
    """``dst`` holding symbolic links to ``count`` image + ``.pts5`` pairs of the landmark folder ``src``
    (sorted by name, from ``start``); skips the calling test when ``src`` is absent."""
    dst.mkdir(parents=True, exist_ok=True)
    for pts in sorted(need(src).glob("*.pts5"))[start:start + count]:
        for f in (pts, pts.with_suffix(".jpg")):
            (dst / f.name).symlink_to(f)
    return dst

"""Helpers for the service tests (not a test module): a real ``python -m runtime serve`` subprocess on
127.0.0.1 with a port it picks itself, killed with its process group however the test ends, plus small
request images made from ``$FACEKIT_DATA/photos``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from benchmarks.memory import status_mib
from conftest import ROOT
from runtime.serve.ready import wait_until_listening

def require_serve_extra():
    """Skip the calling test module unless the serve extra and httpx are installed; returns httpx."""
    import pytest

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"),
                            ("prometheus_client", "prometheus-client")):
        pytest.importorskip(module, reason=f"the service needs the serve extra ({package})")
    return pytest.importorskip("httpx", reason="the tests talk to the server with httpx")


MOBILEFACENET = str(ROOT / "runtime" / "models" / "mobilefacenet.onnx")


class Server:
    """One server process; :meth:`start` waits until it serves, :meth:`kill` / :meth:`terminate` end it."""

    def __init__(self, galleries: Path, log: Path, *args: str):
        self.galleries, self.log_path, self.args = Path(galleries), Path(log), list(args)
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0",
               "--galleries", str(self.galleries), "--no-access-log", "--log-level", "warning", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc

    def start(self, timeout: float = 90.0) -> "Server":
        """Spawn and wait for the "listening on" line (AssertionError with the log if it exits first)."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.spawn()
        try:
            self.url = wait_until_listening(self.proc, self.log_path, timeout, start)
        except RuntimeError as e:
            self.kill()
            raise AssertionError(str(e)) from None
        return self

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def rss_mb(self) -> float:
        """Resident memory of the server process (MiB)."""
        rss = status_mib("VmRSS", self.proc.pid)
        assert rss == rss, "no VmRSS"  # NaN: no such process or field
        return rss

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it (no-op once it is gone)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM the server and return its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def small_jpeg(path: Path, side: int = 256) -> bytes:
    """``path`` resized so its longer side is ``side`` px, as JPEG bytes (quality 90)."""
    img = cv2.imread(str(path))
    s = side / max(img.shape[:2])
    img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def blank_jpeg(h: int = 120, w: int = 160) -> bytes:
    """A grey picture without a face."""
    return cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))[1].tobytes()

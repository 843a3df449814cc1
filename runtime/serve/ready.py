"""The line ``python -m runtime serve`` prints once it serves requests, and how a process that started it
waits for that line (tests, benchmarks, supervisors reading its log)."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

READY_PREFIX = "facekit serve: listening on "
READY_LINE = re.compile(re.escape(READY_PREFIX) + r"(http://\S+:\d+)")


def wait_until_listening(proc: subprocess.Popen, log_path: Path, timeout: float, start: int = 0) -> str:
    """The service URL from the ready line in ``log_path`` (read from byte ``start``). RuntimeError with the
    log's end when the process exits first or the line does not come within ``timeout`` seconds."""
    t0 = time.monotonic()
    text = ""
    while time.monotonic() - t0 < timeout:
        text = Path(log_path).read_bytes()[start:].decode("utf-8", "replace")
        m = READY_LINE.search(text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{text[-3000:]}")

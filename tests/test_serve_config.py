"""The service's options and its isolation from the core install (no web framework needed for these)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import run_python
from runtime.cli import main
from runtime.serve.batcher import MicroBatcher, QueueFull
from runtime.serve.config import ServeConfig, ServeError, read_api_keys


def test_runtime_and_its_cli_never_import_the_web_framework():
    code = ("import sys, runtime, runtime.cli; runtime.cli.build_parser().parse_args(['detect', 'x.jpg']); "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'multipart') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    run_python(code)


def test_api_key_file_keeps_one_key_per_line(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\n  first-key-0123456789  \nsecond-key-0123456789\n")
    assert read_api_keys(f) == ("first-key-0123456789", "second-key-0123456789")


@pytest.mark.parametrize("text, words", [("# only a comment\n", "no key"), ("short\n", "at least 16"),
                                         (None, "cannot read")])
def test_unusable_api_key_files_are_refused(tmp_path, text, words):
    f = tmp_path / "keys"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ServeError, match=words):
        read_api_keys(f)


def test_invalid_limits_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ServeError, match="max_batch"):
        ServeConfig(galleries=tmp_path, max_batch=0)
    rc = main(["serve", "--galleries", str(tmp_path), "--request-timeout", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: invalid value for request_timeout_s") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- batcher


def _embed_rows(crops: np.ndarray) -> np.ndarray:
    """A stand-in recognizer whose output row depends only on its own crop."""
    time.sleep(0.02)
    return crops.reshape(len(crops), -1)[:, :4].astype(np.float32)


def test_micro_batcher_merges_concurrent_submissions_and_keeps_each_answer():
    sizes: list[int] = []
    b = MicroBatcher(_embed_rows, max_batch=8, max_wait_s=0.05, on_batch=lambda n, s: sizes.append(n))
    try:
        crops = [np.full((k, 2, 2, 3), i, np.uint8) for i, k in enumerate((1, 2, 3, 1, 1, 9))]
        futures = [b.submit(c) for c in crops]
        for c, f in zip(crops, futures):
            assert np.array_equal(f.result(10), _embed_rows(c))
        assert b.idle()
        assert np.array_equal(b.run_inline(crops[1]), _embed_rows(crops[1])) and sizes[-1] == 2
    finally:
        b.close()
    assert max(sizes) > 1 and 9 in sizes  # merged, and the oversized one ran alone
    assert all(n <= 8 for n in sizes if n != 9)


def test_micro_batcher_bounds_its_queue_drops_expired_work_and_reports_failures():
    gate = threading.Event()

    def slow(crops):
        gate.wait(10)
        return _embed_rows(crops)

    b = MicroBatcher(slow, max_batch=1, max_wait_s=0, max_queue=2)
    try:
        running = b.submit(np.zeros((1, 2, 2, 3), np.uint8))
        time.sleep(0.1)  # taken by the worker, which now waits on the gate
        queued = b.submit(np.zeros((1, 2, 2, 3), np.uint8), deadline=time.monotonic() + 0.01)
        b.submit(np.zeros((1, 2, 2, 3), np.uint8))
        with pytest.raises(QueueFull):
            b.submit(np.zeros((1, 2, 2, 3), np.uint8))
        time.sleep(0.05)
        gate.set()
        assert running.result(10).shape == (1, 4)
        with pytest.raises(TimeoutError):
            queued.result(10)
    finally:
        b.close()
    failing = MicroBatcher(lambda crops: 1 / 0, max_wait_s=0)
    try:
        with pytest.raises(ZeroDivisionError):
            failing.submit(np.zeros((1, 2, 2, 3), np.uint8)).result(10)
    finally:
        failing.close()

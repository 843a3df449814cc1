"""benchmarks/triton.py without a server: the level timer (N clients, bounded, errors surface), the
Triton / in-process ratios and the report table."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (the triton extra) is not installed")
from benchmarks import latency, triton  # noqa: E402


def test_time_level_runs_n_clients_and_reports_percentiles():
    seen = set()

    def make():
        def call(i):
            seen.add(threading.get_ident())
            time.sleep(0.01)
        return call

    row = triton.time_level(make, concurrency=4, seconds=0.2)
    assert len(seen - {threading.get_ident()}) == 4 and row["concurrency"] == 4  # warm-up runs here
    assert row["requests"] >= 4 * latency.MIN_REQUESTS_PER_CLIENT
    assert 9 <= row["p50_ms"] <= row["p99_ms"] and row["throughput_per_s"] > 0


def test_time_level_reports_a_failing_client():
    def make():
        def call(i):
            raise ValueError("server said no")
        return call

    with pytest.raises(RuntimeError, match="client 0: ValueError: server said no"):
        triton.time_level(make, concurrency=2, seconds=0.1, warmup=0)


def test_ratios_and_report_compare_like_with_like():
    rows = [{"workload": "recognizer", "mode": m, "concurrency": c, "requests": 10, "throughput_per_s": t,
             "p50_ms": 1.0, "p99_ms": 2.0, **({"recognizer_batches": {"1": 3, "4": 2}} if m == "triton" else {})}
            for m, c, t in (("in-process", 1, 10.0), ("triton", 1, 5.0), ("in-process", 4, 20.0), ("triton", 4, 30.0))]
    assert triton.ratios(rows) == {"recognizer": {"1": 0.5, "4": 1.5}}
    result = {"date": "2026-12-01", "machine": {"cpu": "AMD EPYC", "cores": 2, "gpus": []}, "rows": rows,
              "server": {"device": "Triton 2.51.0", "repository": "Python backend", "options": {}},
              "models": {"recognizer": "runtime/models/recognizer.onnx"}, "parity": {}, "seconds_per_level": 1}
    md = triton.to_markdown(result)
    assert "| 4 | 20.0 | 1.0 / 2.0 | 30.0 | 1.0 / 2.0 | 1.50 | 1×3, 4×2 |" in md

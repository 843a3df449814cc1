"""The HTTP service against the in-process pipeline: throughput and p50/p99 latency at several concurrencies,
both measured in one run on the same photos.

Workload: ``POST /v1/embed`` with one photo per request (the single portraits of ``$FACEKIT_DATA/photos``,
longer side 640 px, JPEG-encoded once before timing). Each level is :func:`benchmarks.latency.time_level`:
``c`` closed-loop clients (threads), each sending its next request when the previous answer arrives, for a
time budget. The in-process side is the same loop calling ``FacePipeline.embed`` on the same JPEG bytes
(decoding included on both sides), once with the pipeline's defaults and once with one thread per model
call (``model_options={"threads": 1}``, what the server uses), and, at the highest concurrency, one
``FacePipeline.embed_many`` call over :data:`MANY_IMAGES` images per round for each pipeline. The batched
reference is the best in-process throughput at the highest concurrency.

The server is a real ``python -m runtime serve`` subprocess on 127.0.0.1. Each client thread speaks plain
HTTP/1.1 over one kept-alive connection (:class:`HttpConnection`): on a 2-core machine the client shares the
CPU with the server, and httpx spends many times its CPU per request (``--client httpx`` runs httpx instead;
the client CPU column shows the difference). CPU seconds per request are reported for every row: the
server's and the client's for the service, the process's for in-process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.child_process import child_env
from benchmarks.latency import CLIENT_TIMEOUT_S, time_level
from evaluation.data import PROJECT_ROOT as ROOT
from runtime.serve.ready import wait_until_listening

CONCURRENCY = (1, 4, 16)
ROUNDS = 4
#: seconds of load per side and concurrency (split into ROUNDS segments)
LEVEL_SECONDS = 24.0
#: images per FacePipeline.embed_many call (one call per round, at the highest concurrency)
MANY_IMAGES = 64
NOTES = (
    "Closed loop: each client (a thread) sends its next request when the previous answer arrives; one photo "
    "(640 px JPEG, one face) per request; JPEG decoding included on both sides. Per concurrency, the in-process "
    f"and service segments alternate ({ROUNDS} rounds) so that load changes on a shared machine hit all rows "
    "alike.",
    "The client runs on the same machine as the server (one process, one kept-alive connection per client "
    "thread): its CPU is part of the service's cost here and is listed (client CPU ms/req); the in-process "
    "rows have no client.",
    "Batched in-process reference: the best in-process throughput at the highest concurrency: "
    f"FacePipeline.embed_many (one call over {MANY_IMAGES} images per round) and the thread pools, each with "
    "the default model threads and with one thread per model call.",
    "On a machine shared with other jobs, wall-clock throughput follows each process's share of the CPU; the "
    "CPU ms per request do not, and show where the time goes.",
)


class NoPhotos(Exception):
    """No photos to send: ``$FACEKIT_DATA/photos`` is missing."""


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    """One configuration at one concurrency: every latency, wall time, requests (timed, and untimed warm-up)
    and CPU seconds (the process's, or the server's plus the client's)."""

    mode: str
    concurrency: int
    latencies_s: np.ndarray
    wall_s: float
    cpu_s: float
    warmup_requests: int = 0
    client_cpu_s: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        lat = self.latencies_s[np.isfinite(self.latencies_s)] * 1e3
        n, all_requests = len(self.latencies_s), len(self.latencies_s) + self.warmup_requests
        pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if len(lat) else (lambda q: None)
        return {"mode": self.mode, "concurrency": self.concurrency, "requests": n,
                "throughput_per_s": round(n / self.wall_s, 2), "p50_ms": pct(50), "p99_ms": pct(99),
                "cpu_ms_per_request": round(1e3 * self.cpu_s / all_requests, 1),
                "client_cpu_ms_per_request": None if self.client_cpu_s is None else
                round(1e3 * self.client_cpu_s / all_requests, 2), "note": self.note}


def merge(parts: list[LoadResult]) -> LoadResult:
    """Segments of one configuration as one result (latencies joined, times and counts added)."""
    client = None if parts[0].client_cpu_s is None else sum(p.client_cpu_s for p in parts)
    return LoadResult(parts[0].mode, parts[0].concurrency, np.concatenate([p.latencies_s for p in parts]),
                      sum(p.wall_s for p in parts), sum(p.cpu_s for p in parts),
                      sum(p.warmup_requests for p in parts), client, parts[0].note)


def encode_photos(photos: list[np.ndarray]) -> list[bytes]:
    import cv2

    return [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for p in photos]


def timed_level(mode: str, make_caller: Callable[[], Callable[[int], object]], concurrency: int, seconds: float,
                server_pid: int | None = None) -> LoadResult:
    """:func:`time_level` with CPU accounting: this process's CPU, plus the server's when ``server_pid``."""
    server0 = process_cpu_s(server_pid) if server_pid else 0.0
    cpu0 = time.process_time()
    row = time_level(make_caller, concurrency, seconds, keep_latencies=True)
    cpu = time.process_time() - cpu0
    lat = np.asarray(row["latencies_s"])
    if server_pid:
        return LoadResult(mode, concurrency, lat, row["wall_s"], process_cpu_s(server_pid) - server0, concurrency,
                          client_cpu_s=cpu)
    return LoadResult(mode, concurrency, lat, row["wall_s"], cpu, concurrency)


def recognizer_calls(url: str) -> tuple[float, float]:
    """(recognizer calls, faces embedded) so far, from the server's ``/metrics``."""
    conn = HttpConnection(url)
    try:
        status, text = conn.post("/metrics", b"", "text/plain", method="GET")
    finally:
        conn.close()
    values = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("facekit_recognizer_batch_faces_count", "facekit_recognizer_batch_faces_sum"):
            values[name] = float(value)
    return (values.get("facekit_recognizer_batch_faces_count", 0.0),
            values.get("facekit_recognizer_batch_faces_sum", 0.0))


def in_process_many(pipe, name: str, images: list[bytes], n: int, level: int) -> LoadResult:
    """One ``pipe.embed_many`` call over ``n`` images, consumed to the end (no per-image latency), listed at
    concurrency ``level``."""
    batch = [images[i % len(images)] for i in range(n)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = list(pipe.embed_many(batch))
    wall = time.perf_counter() - t0
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"embed_many failed on {len(failed)} images: {failed[0]}")
    return LoadResult(name, level, np.full(n, np.nan), wall, time.process_time() - cpu0,
                      note=f"one call over {n} images per round; no per-image latency")


# --------------------------------------------------------------------------------------------- service


class ServerProcess:
    """``python -m runtime serve`` on 127.0.0.1 with a port it picks; galleries and log in a temporary folder."""

    def __init__(self, extra_args: list[str]):
        self.folder = tempfile.TemporaryDirectory(prefix="facekit-serve-bench-")
        self.log_path = Path(self.folder.name) / "server.log"
        cmd = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0", "--galleries",
               str(Path(self.folder.name) / "galleries"), "--no-access-log", "--log-level", "warning", *extra_args]
        env = child_env(PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> str:
        try:
            return wait_until_listening(self.proc, self.log_path, timeout)
        except RuntimeError:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.folder.cleanup()


class HttpConnection:
    """One kept-alive HTTP/1.1 connection to ``url`` (``http://host:port``) that POSTs bodies: the cheapest
    honest client (a few socket calls and a header parse per request)."""

    def __init__(self, url: str):
        self.host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((self.host, int(port)), timeout=CLIENT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.port = int(port)

    def post(self, path: str, body: bytes, content_type: str = "image/jpeg",
             method: str = "POST") -> tuple[int, bytes]:
        """(status, answer body) of ``POST path`` with ``body`` (or another ``method``)."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        self.sock.sendall(head + body)
        status = int(self.reader.readline().split(b" ", 2)[1])
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        return status, self.reader.read(length)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def embed_caller(url: str, images: list[bytes], client: str = "raw") -> Callable[[], Callable[[int], object]]:
    """``make_caller`` for :func:`time_level`: each caller has its own connection and POSTs image ``i``."""
    def make() -> Callable[[int], object]:
        if client == "httpx":
            import httpx

            session = httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S)
            post = (lambda body: _status_and_body(session.post("/v1/embed", content=body,
                                                               headers={"content-type": "image/jpeg"})))
        else:
            conn = HttpConnection(url)
            post = (lambda body: conn.post("/v1/embed", body))

        def call(i: int) -> bytes:
            status, answer = post(images[i % len(images)])
            if status != 200:
                raise RuntimeError(f"the service answered {status}: {answer[:300]!r}")
            return answer
        return call
    return make


def _status_and_body(response) -> tuple[int, bytes]:
    return response.status_code, response.content


# -------------------------------------------------------------------------------------------- the run


def run_benchmark(pipes: dict, images: list[bytes], server: ServerProcess, concurrency=CONCURRENCY,
                  seconds: float = LEVEL_SECONDS, client: str = "raw", progress=print) -> dict:
    """Every concurrency on every side for ``seconds`` each, in ``ROUNDS`` alternating segments (so that a
    change in the machine's load during the run hits all rows alike); the summary. ``pipes``: name → pipeline."""
    first = next(iter(pipes.values()))
    expect = [len(first.embed(img)) for img in images]
    answer = json.loads(embed_caller(server.url, images)()(0))
    if len(answer["faces"]) != expect[0]:
        raise RuntimeError(f"the service found {len(answer['faces'])} faces, in-process {expect[0]}")
    rows: list[dict] = []
    for c in concurrency:
        progress(f"concurrency {c}: {ROUNDS} × {seconds / ROUNDS:g} s per side, alternating")
        parts: dict[str, list[LoadResult]] = {}
        batches = [0.0, 0.0]  # recognizer calls, faces, during the service segments
        for _ in range(ROUNDS):
            for name, pipe in pipes.items():
                make = (lambda p: lambda: (lambda i: p.embed(images[i % len(images)])))(pipe)
                parts.setdefault(name, []).append(timed_level(name, make, c, seconds / ROUNDS))
                if c == max(concurrency) and hasattr(pipe, "embed_many"):
                    many = name.replace("embed (thread pool, ", "embed_many (")
                    parts.setdefault(many, []).append(in_process_many(pipe, many, images, MANY_IMAGES, c))
            calls0 = recognizer_calls(server.url)
            parts.setdefault("service", []).append(timed_level(
                f"service POST /v1/embed ({client} client)", embed_caller(server.url, images, client), c,
                seconds / ROUNDS, server_pid=server.proc.pid))
            batches = [total + after - before for total, before, after in
                       zip(batches, calls0, recognizer_calls(server.url))]
        rows += [merge(p).to_dict() for p in parts.values()]
        rows[-1]["faces_per_recognizer_call"] = round(batches[1] / max(batches[0], 1), 2)
        for r in rows[-len(parts):]:
            progress(f"  {r['mode']}: {r['throughput_per_s']:.2f}/s, p50 {_num(r['p50_ms'])} ms, "
                     f"p99 {_num(r['p99_ms'])} ms")
    return {"rows": rows, "summary": summarize(rows, max(concurrency))}


def summarize(rows: list[dict], top: int) -> dict:
    """Ratios of the run: service / in-process throughput at each concurrency (best in-process row), the
    service against the batched reference, and the service's p99 / p50 at the highest concurrency."""
    svc = {r["concurrency"]: r for r in rows if r["mode"].startswith("service")}
    inp: dict[int, dict] = {}
    for r in rows:
        if r["mode"].startswith("in-process embed (") and r["throughput_per_s"] > inp.get(
                r["concurrency"], {"throughput_per_s": -1})["throughput_per_s"]:
            inp[r["concurrency"]] = r
    candidates = [r for r in rows if r["mode"].startswith("in-process embed_many")] + ([inp[top]] if top in inp else [])
    reference = max(candidates, key=lambda r: r["throughput_per_s"])
    out = {"vs_best_in_process_same_concurrency": {c: round(svc[c]["throughput_per_s"] / inp[c]["throughput_per_s"], 3)
                                                   for c in svc if c in inp},
           "batched_reference": f"{reference['mode']} at concurrency {reference['concurrency']}",
           "batched_reference_per_s": reference["throughput_per_s"]}
    if top in svc:
        cost = svc[top]["cpu_ms_per_request"] + (svc[top]["client_cpu_ms_per_request"] or 0.0)
        out["service_cpu_vs_in_process_cpu"] = round(cost / min(
            r["cpu_ms_per_request"] for r in rows if r["mode"].startswith("in-process") and r["concurrency"] == top),
            3)
        out["service_vs_batched_reference"] = round(svc[top]["throughput_per_s"] / reference["throughput_per_s"], 3)
        out["service_p99_over_p50"] = round(svc[top]["p99_ms"] / svc[top]["p50_ms"], 2)
        out["goal_throughput_met"] = out["service_vs_batched_reference"] >= 0.8
        out["goal_tail_met"] = out["service_p99_over_p50"] <= 3.0
    return out


def plot(report: dict, path: Path) -> str:
    """Throughput and p99 latency against concurrency, one line per mode."""
    from benchmarks.plots import _plt, clients_axis, save_with_machine

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted({r["concurrency"] for r in report["rows"] if r["p50_ms"] is not None})
    for mode in dict.fromkeys(r["mode"] for r in report["rows"] if r["p50_ms"] is not None):
        rows = sorted((r for r in report["rows"] if r["mode"] == mode), key=lambda r: r["concurrency"])
        style = "s--" if mode.startswith("service") else "o-"
        axes[0].plot([r["concurrency"] for r in rows], [r["throughput_per_s"] for r in rows], style, label=mode)
        axes[1].plot([r["concurrency"] for r in rows], [r["p99_ms"] for r in rows], style, label=mode)
    for ax, title in zip(axes, ("photos/s (POST /v1/embed vs FacePipeline.embed)", "p99 latency (ms)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("concurrent clients")
        clients_axis(ax, levels)
    axes[0].legend(fontsize=7)
    return save_with_machine(fig, report["machine"], path)


def _num(v, fmt: str = ".0f") -> str:
    return "–" if v is None or v != v else format(v, fmt)


def to_markdown(report: dict) -> str:
    """The report as markdown: machine, table, ratios, notes."""
    from benchmarks.report import report_head, table

    lines = report_head("facekit service benchmark", report)
    lines += [table(["mode", "concurrency", "requests", "throughput /s", "p50 ms", "p99 ms", "CPU ms/req",
                     "client CPU ms/req", "faces / recognizer call"],
                    [[r["mode"], r["concurrency"], r["requests"], f"{r['throughput_per_s']:.2f}", _num(r["p50_ms"]),
                      _num(r["p99_ms"]), _num(r["cpu_ms_per_request"], ".1f"),
                      _num(r["client_cpu_ms_per_request"], ".2f"), _num(r.get("faces_per_recognizer_call"), ".2f")]
                     for r in report["rows"]]), ""]
    s = report["summary"]
    lines.append("Service / best in-process throughput at the same concurrency: "
                 + ", ".join(f"c={c}: {v:.2f}" for c, v in s["vs_best_in_process_same_concurrency"].items()) + ".")
    if "service_vs_batched_reference" in s:
        lines.append(f"At the highest concurrency the service reaches {100 * s['service_vs_batched_reference']:.0f} % "
                     f"of the batched in-process reference ({s['batched_reference']}, "
                     f"{s['batched_reference_per_s']:.2f} /s; goal ≥ 80 %: "
                     f"{'met' if s['goal_throughput_met'] else 'NOT met'}), p99 / p50 = "
                     f"{s['service_p99_over_p50']:.2f} (goal ≤ 3: {'met' if s['goal_tail_met'] else 'NOT met'}). "
                     f"CPU per request there, server + client over the cheapest in-process row: "
                     f"{s['service_cpu_vs_in_process_cpu']:.2f}.")
    if report.get("plot"):
        lines += ["", f"![throughput and p99 vs clients]({report['plot']})"]
    lines += ["", *[f"- {n}" for n in report.get("notes", [])], ""]
    return "\n".join(lines)


def serve_report(model: Path, landmarks: str, concurrency: tuple[int, ...] = CONCURRENCY,
                 seconds: float = LEVEL_SECONDS, results: Path | None = None,
                 client: str = "raw", progress=print) -> tuple[dict, str]:
    """Run the benchmark for ``model`` and save ``<date>-<machine>-serve.{md,json}`` and its plot in ``results``
    (None: nowhere; ``benchmarks.report.results_dir`` reads it from the command line); returns the report and its
    markdown."""
    import datetime as _dt

    from benchmarks import latency
    from benchmarks import report as rp
    from evaluation.data import data_root
    from runtime.pipeline import FacePipeline

    photos = latency.photos_640(data_root())
    if not photos:
        raise NoPhotos(f"no portraits in {data_root() / 'photos'} (set $FACEKIT_DATA)")
    pipes = {"in-process embed (thread pool, default model threads)": FacePipeline(str(model), landmarks=landmarks),
             "in-process embed (thread pool, 1 thread per model call)": FacePipeline(
                 str(model), landmarks=landmarks, model_options={"threads": 1})}
    report = {"date": _dt.date.today().isoformat(), "machine": rp.machine_info(), "model": rp.shown_path(model),
              "command": rp.run_command()}
    server = ServerProcess(["--recognizer", str(model), "--landmarks", landmarks])
    try:
        report.update(run_benchmark(pipes, encode_photos(photos), server, concurrency, seconds=seconds,
                                    client=client, progress=progress))
    finally:
        server.close()
    report["load_average_at_end"] = rp.load_average()
    report["notes"] = list(NOTES)
    if results is not None:
        stem = results / (rp.report_stem(report["machine"], report["date"]) + "-serve")
        results.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(Path(plot(report, stem / "throughput-latency.png")).relative_to(results))
    md = to_markdown(report)
    if results is not None:
        rp.write_md_and_json(stem, md, report)
        progress(f"wrote {stem}.md and .json")
    return report, md

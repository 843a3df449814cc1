"""The HTTP service against the in-process pipeline: throughput and p50/p99 latency at several concurrencies,
both measured in one run on the same photos.

Workload: ``POST /v1/embed`` with one photo per request (the single portraits of ``$FACEKIT_DATA/photos``,
longer side 640 px, JPEG-encoded once before timing), closed loop: each of ``c`` clients sends its next
request when the previous answer arrives. The in-process side is the same loop with ``c`` threads calling
``FacePipeline.embed`` on the same JPEG bytes (decoding included on both sides), once with the pipeline's
defaults and once with one thread per model call (``model_options={"threads": 1}``, what the server
uses), plus one ``FacePipeline.embed_many`` call over all images when the pipeline has it. The batched
reference is the best in-process throughput at the highest concurrency.

The server is a real ``python -m runtime serve`` subprocess on 127.0.0.1. The load generator is one asyncio
process speaking plain HTTP/1.1 over one kept-alive connection per client (:func:`post_loop`): on a 2-core
machine the client shares the CPU with the server, and httpx spends many times its CPU per request
(``--client httpx`` runs httpx instead; the client CPU column shows the difference). CPU seconds per request are reported for every row: the server's
and the client's for the service, the process's for in-process.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)
ROUNDS = 2
READY = re.compile(r"listening on (http://[\d.]+:\d+)")
NOTES = (
    "Closed loop: each client sends its next request when the previous answer arrives; one photo (640 px "
    f"JPEG, one face) per request; JPEG decoding included on both sides. Per concurrency, the in-process and "
    f"service segments alternate ({ROUNDS} rounds) so that load changes on a shared machine hit all rows alike.",
    "The client runs on the same machine as the server (one asyncio process, one kept-alive connection per "
    "client): its CPU is part of the service's cost here and is listed (client ms CPU/req); the in-process "
    "rows have no client.",
    "Batched in-process reference: the best in-process throughput at the highest concurrency "
    "(FacePipeline.embed_many when the pipeline has it; thread pools with the default and with one thread per "
    "model call).",
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
    """One closed-loop run: ``mode``, ``concurrency``, per-request latencies, wall time and CPU seconds."""

    mode: str
    concurrency: int
    latencies_s: np.ndarray
    wall_s: float
    cpu_s: float
    client_cpu_s: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        lat = self.latencies_s[np.isfinite(self.latencies_s)] * 1e3
        n = len(self.latencies_s)
        pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if len(lat) else (lambda q: None)
        return {"mode": self.mode, "concurrency": self.concurrency, "requests": n,
                "throughput_per_s": round(n / self.wall_s, 2), "p50_ms": pct(50), "p99_ms": pct(99),
                "cpu_ms_per_request": round(1e3 * self.cpu_s / n, 1),
                "client_cpu_ms_per_request": None if self.client_cpu_s is None else
                round(1e3 * self.client_cpu_s / n, 2), "note": self.note}


def merge(parts: list[LoadResult]) -> LoadResult:
    """Segments of one configuration as one result (latencies joined, times added)."""
    client = None if parts[0].client_cpu_s is None else sum(p.client_cpu_s for p in parts)
    return LoadResult(parts[0].mode, parts[0].concurrency, np.concatenate([p.latencies_s for p in parts]),
                      sum(p.wall_s for p in parts), sum(p.cpu_s for p in parts), client, parts[0].note)


def encode_photos(photos: list[np.ndarray]) -> list[bytes]:
    import cv2

    return [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for p in photos]


def requests_for(concurrency: int, per_client: int) -> int:
    return max(4 * per_client, per_client * concurrency)


# ------------------------------------------------------------------------------------------ in-process


def in_process(pipe, name: str, images: list[bytes], concurrency: int, n: int) -> LoadResult:
    """``n`` ``pipe.embed`` calls from ``concurrency`` threads, each calling in a closed loop."""
    lat: list[float] = []
    counter = iter(range(n))

    def client() -> None:
        for i in counter:  # a shared iterator hands out the work (next() on it is atomic under the GIL)
            t0 = time.perf_counter()
            pipe.embed(images[i % len(images)])
            lat.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return LoadResult(name, concurrency, np.asarray(lat), time.perf_counter() - t0, time.process_time() - cpu0)


def in_process_many(pipe, images: list[bytes], n: int) -> LoadResult | None:
    """One ``pipe.embed_many`` call over ``n`` images (None when the pipeline has no ``embed_many``)."""
    many = getattr(pipe, "embed_many", None)
    if many is None:
        return None
    batch = [images[i % len(images)] for i in range(n)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    many(batch)
    return LoadResult("in-process embed_many", n, np.full(n, np.nan), time.perf_counter() - t0,
                      time.process_time() - cpu0, note="one call; no per-image latency")


# --------------------------------------------------------------------------------------------- service


class ServerProcess:
    """``python -m runtime serve`` on 127.0.0.1 with a port it picks; galleries and log in a temporary folder."""

    def __init__(self, extra_args: list[str]):
        self.folder = tempfile.TemporaryDirectory(prefix="facekit-serve-bench-")
        self.log_path = Path(self.folder.name) / "server.log"
        cmd = [sys.executable, "-m", "runtime", "serve", "--host", "127.0.0.1", "--port", "0", "--galleries",
               str(Path(self.folder.name) / "galleries"), "--no-access-log", "--log-level", "warning", *extra_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            text = self.log_path.read_text("utf-8", "replace")
            m = READY.search(text)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.folder.cleanup()


async def post_loop(url: str, path: str, bodies, lat: list[float], check) -> None:
    """One client: POST each of ``bodies`` (an iterator shared with the other clients) as ``image/jpeg`` on
    one kept-alive HTTP/1.1 connection, recording each latency; ``check(status, body)`` validates answers."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for body in bodies:
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
            t0 = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            check(status, answer)
    finally:
        writer.close()


async def httpx_loop(url: str, path: str, bodies, lat: list[float], check) -> None:
    """:func:`post_loop` with httpx (one client, one connection)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for body in bodies:
            t0 = time.perf_counter()
            r = await client.post(path, content=body, headers={"content-type": "image/jpeg"})
            lat.append(time.perf_counter() - t0)
            check(r.status_code, r.content)


def service(server: ServerProcess, images: list[bytes], concurrency: int, n: int, expect_faces: list[int],
            client: str = "raw") -> LoadResult:
    """``n`` ``POST /v1/embed`` requests from ``concurrency`` clients (after one untimed request each)."""
    loop_fn = httpx_loop if client == "httpx" else post_loop
    faces = {img: k for img, k in zip(images, expect_faces)}

    def drive(requests: int) -> tuple[list[float], float]:
        lat: list[float] = []
        bodies = iter([images[i % len(images)] for i in range(requests)])

        def check(status: int, answer: bytes) -> None:
            if status != 200:
                raise RuntimeError(f"unexpected answer {status}: {answer[:300]!r}")

        async def run() -> None:
            await asyncio.gather(*(loop_fn(server.url, "/v1/embed", bodies, lat, check) for _ in range(concurrency)))

        t0 = time.perf_counter()
        asyncio.run(run())
        return lat, time.perf_counter() - t0

    drive(concurrency)  # warm every path once
    check_one = json.loads(_post_once(server.url, images[0]))
    if len(check_one["faces"]) != faces[images[0]]:
        raise RuntimeError(f"the service found {len(check_one['faces'])} faces, in-process {faces[images[0]]}")
    server_cpu0, client_cpu0 = process_cpu_s(server.proc.pid), time.process_time()
    lat, wall = drive(n)
    return LoadResult(f"service POST /v1/embed ({client} client)", concurrency, np.asarray(lat), wall,
                      process_cpu_s(server.proc.pid) - server_cpu0, time.process_time() - client_cpu0)


def _post_once(url: str, body: bytes) -> bytes:
    out: list[bytes] = []

    async def run() -> None:
        await post_loop(url, "/v1/embed", iter([body]), [], lambda status, answer: out.append(answer))

    asyncio.run(run())
    return out[0]


# -------------------------------------------------------------------------------------------- the run


def run_benchmark(pipes: dict, images: list[bytes], server: ServerProcess, concurrency=CONCURRENCY,
                  per_client: int = 24, client: str = "raw", progress=print) -> dict:
    """Every concurrency on every side; per level, ``ROUNDS`` alternating segments (so that a change in the
    machine's load during the run hits all rows alike); the summary. ``pipes``: name → in-process pipeline."""
    first = next(iter(pipes.values()))
    expect = [len(first.embed(img)) for img in images]
    for pipe in pipes.values():
        pipe.embed(images[0])  # warm
    rows: list[dict] = []
    for c in concurrency:
        share = -(-requests_for(c, per_client) // ROUNDS)
        progress(f"concurrency {c}: {ROUNDS} × {share} requests per side, alternating")
        parts: dict[str, list[LoadResult]] = {}
        for _ in range(ROUNDS):
            for name, pipe in pipes.items():
                parts.setdefault(name, []).append(in_process(pipe, name, images, c, share))
            parts.setdefault("service", []).append(service(server, images, c, share, expect, client))
        rows += [merge(p).to_dict() for p in parts.values()]
    many = in_process_many(first, images, requests_for(max(concurrency), per_client))
    if many is not None:
        rows.append(many.to_dict())
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
    candidates = [r for r in rows if r["mode"] == "in-process embed_many"] + ([inp[top]] if top in inp else [])
    reference = max(candidates, key=lambda r: r["throughput_per_s"])
    out = {"vs_best_in_process_same_concurrency": {c: round(svc[c]["throughput_per_s"] / inp[c]["throughput_per_s"], 3)
                                                   for c in svc if c in inp},
           "batched_reference": f"{reference['mode']} at concurrency {reference['concurrency']}",
           "batched_reference_per_s": reference["throughput_per_s"]}
    if top in svc:
        out["service_vs_batched_reference"] = round(svc[top]["throughput_per_s"] / reference["throughput_per_s"], 3)
        out["service_p99_over_p50"] = round(svc[top]["p99_ms"] / svc[top]["p50_ms"], 2)
        out["goal_throughput_met"] = out["service_vs_batched_reference"] >= 0.8
        out["goal_tail_met"] = out["service_p99_over_p50"] <= 3.0
    return out


def _num(v, fmt: str = ".0f") -> str:
    return "–" if v is None or v != v else format(v, fmt)


def to_markdown(report: dict) -> str:
    """The report as markdown: machine, table, ratios, notes."""
    from benchmarks.report import machine_line, table

    m = report["machine"]
    lines = [f"# facekit service benchmark — {report['date']}", "",
             f"Machine: {machine_line(m)}; load average at start {m.get('load_average_at_start')}, at the end "
             f"{report.get('load_average_at_end')}.", "", f"Command: `{report['command']}`", "",
             table(["mode", "concurrency", "requests", "throughput /s", "p50 ms", "p99 ms", "CPU ms/req",
                    "client CPU ms/req"],
                   [[r["mode"], r["concurrency"], r["requests"], f"{r['throughput_per_s']:.2f}", _num(r["p50_ms"]),
                     _num(r["p99_ms"]), _num(r["cpu_ms_per_request"], ".1f"),
                     _num(r["client_cpu_ms_per_request"], ".2f")] for r in report["rows"]]), ""]
    s = report["summary"]
    lines.append("Service / best in-process throughput at the same concurrency: "
                 + ", ".join(f"c={c}: {v:.2f}" for c, v in s["vs_best_in_process_same_concurrency"].items()) + ".")
    if "service_vs_batched_reference" in s:
        lines.append(f"At the highest concurrency the service reaches {100 * s['service_vs_batched_reference']:.0f} % "
                     f"of the batched in-process reference ({s['batched_reference']}, "
                     f"{s['batched_reference_per_s']:.2f} /s; goal ≥ 80 %: "
                     f"{'met' if s['goal_throughput_met'] else 'NOT met'}), p99 / p50 = "
                     f"{s['service_p99_over_p50']:.2f} (goal ≤ 3: {'met' if s['goal_tail_met'] else 'NOT met'}).")
    lines += ["", *[f"- {n}" for n in report.get("notes", [])], ""]
    return "\n".join(lines)


def serve_report(model: Path, landmarks: str, concurrency: str, per_client: int, results: Path | None,
                 client: str = "raw", write: bool = True, progress=print) -> tuple[dict, str]:
    """Run the benchmark for ``model`` and (``write``) save ``<date>-<machine>-serve.{md,json}`` in
    ``results`` (default ``benchmarks/results``); returns the report and its markdown."""
    import datetime as _dt

    from benchmarks import latency
    from benchmarks import report as rp
    from evaluation.data import data_root
    from runtime.files import atomic_write_bytes
    from runtime.pipeline import FacePipeline

    photos = latency.photos_640(data_root())
    if not photos:
        raise NoPhotos(f"no portraits in {data_root() / 'photos'} (set $FACEKIT_DATA)")
    results = results or rp.RESULTS_DIR
    pipes = {"in-process embed (thread pool, default model threads)": FacePipeline(str(model), landmarks=landmarks),
             "in-process embed (thread pool, 1 thread per model call)": FacePipeline(
                 str(model), landmarks=landmarks, model_options={"threads": 1})}
    levels = tuple(int(c) for c in concurrency.split(","))
    report = {"date": _dt.date.today().isoformat(), "machine": rp.machine_info(), "model": str(model),
              "command": "python benchmarks/run.py " + " ".join(sys.argv[1:])}
    server = ServerProcess(["--recognizer", str(model), "--landmarks", landmarks])
    try:
        report.update(run_benchmark(pipes, encode_photos(photos), server, levels, per_client=per_client,
                                    client=client, progress=progress))
    finally:
        server.close()
    report["load_average_at_end"] = rp.load_average()
    report["notes"] = list(NOTES)
    md = to_markdown(report)
    if write:
        results.mkdir(parents=True, exist_ok=True)
        stem = results / (rp.report_stem(report["machine"], report["date"]) + "-serve")
        atomic_write_bytes(f"{stem}.md", md.encode())
        atomic_write_bytes(f"{stem}.json", (json.dumps(report, indent=2) + "\n").encode())
        progress(f"wrote {stem}.md and .json")
    return report, md

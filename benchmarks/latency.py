"""Latency and throughput of a recognizer backend, and of the whole photo → embedding pipeline.

Recognizer: for each batch size (1, 8, 64, 256) a few warm-up calls, then timed calls until both a
minimum count and a time budget are reached; p50 / p95 of the per-call wall time (ms) and throughput
(faces/s = batch / mean call time). Inputs are preprocessed float tensors, so this is the model alone.

Pipeline: ``FacePipeline.embed`` (detect → landmarks → warp → embed) on decoded 640 px photos with one face
each (the single portraits of ``$FACEKIT_DATA/photos``); ms/photo p50/p95 and photos/s, one photo at a time.
JPEG decoding is not included.

Serving (:func:`time_level`): N closed-loop clients, each sending its next request when the previous
answer arrives, for a time budget; p50 / p99 and requests/s of the level (Triton and HTTP service benchmarks).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

BATCH_SIZES = (1, 8, 64, 256)

#: Closed-loop levels (:func:`time_level`): each client sends at least this many requests ...
MIN_REQUESTS_PER_CLIENT = 3
#: ... and no more than this many in one level (bounds a run on a fast machine)
MAX_REQUESTS_PER_CLIENT = 5000
#: the longest one client call may take
CLIENT_TIMEOUT_S = 120.0


@dataclass
class LatencyRow:
    backend: str
    batch: int
    p50_ms: float
    p95_ms: float
    throughput: float
    calls: int

    def to_dict(self) -> dict:
        return {"backend": self.backend, "batch": self.batch, "p50_ms": round(self.p50_ms, 3),
                "p95_ms": round(self.p95_ms, 3), "throughput_per_s": round(self.throughput, 1), "calls": self.calls}


def time_calls(fn: Callable[[], object], warmup: int = 3, min_calls: int = 5, budget_s: float = 2.0,
               max_calls: int = 1000) -> np.ndarray:
    """Per-call wall times (seconds) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def recognizer_latency(embedder, batch_sizes=BATCH_SIZES, warmup: int = 3, min_calls: int = 5,
                       budget_s: float = 2.0, seed: int = 0) -> list[LatencyRow]:
    """p50/p95 and throughput of ``embedder`` on random crops of its input size at each batch size
    (preprocessing included)."""
    rng = np.random.default_rng(seed)
    rows = []
    max_batch = getattr(embedder, "max_batch", None)
    for b in batch_sizes:
        if max_batch and b > max_batch and not getattr(embedder, "fixed_batch", None):
            continue
        h, w = embedder.spec.input_size
        crops = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
        # fewer calls for big batches: at least 2 timed calls, but keep each size to about the budget
        times = time_calls(lambda: embedder(crops), warmup=warmup if b < 64 else 1,
                           min_calls=min_calls if b < 64 else 2, budget_s=budget_s)
        rows.append(LatencyRow(embedder.name, b, float(np.percentile(times, 50) * 1e3),
                               float(np.percentile(times, 95) * 1e3), float(b / times.mean()), len(times)))
    return rows


@dataclass
class PipelineLatency:
    photos: int
    p50_ms: float
    p95_ms: float
    photos_per_s: float
    faces_found: list[int]
    size: int
    calls: int
    note: str = ""

    def to_dict(self) -> dict:
        return {"photos": self.photos, "size_px": self.size, "p50_ms": round(self.p50_ms, 2),
                "p95_ms": round(self.p95_ms, 2), "photos_per_s": round(self.photos_per_s, 2),
                "faces_found": self.faces_found, "calls": self.calls, "note": self.note}


SINGLE_PORTRAITS = ("obama.jpg", "obama2.jpg", "biden.jpg", "angelina_jolie.jpg", "kate_siegel.jpg",
                    "paul_rudd.jpg", "shea_whigham.jpg")


def photos_640(data_dir: Path, size: int = 640) -> list[np.ndarray]:
    """The single-face portraits of ``data_dir/photos``, resized so the longer side is ``size`` px (BGR)."""
    import cv2

    from runtime.image_io import load_image

    out = []
    for name in SINGLE_PORTRAITS:
        p = Path(data_dir) / "photos" / name
        if p.is_file():
            img = load_image(p)
            s = size / max(img.shape[:2])
            out.append(cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)),
                                  interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC))
    return out


def pipeline_latency(pipeline, photos: list[np.ndarray], rounds: int = 3, warmup: int = 2) -> PipelineLatency:
    """Time ``pipeline.embed(photo)`` one photo at a time over ``rounds`` passes of ``photos``."""
    if not photos:
        raise ValueError("no photos to time")
    faces = [len(pipeline.embed(p)) for p in photos]
    for _ in range(warmup - 1):
        pipeline.embed(photos[0])
    times = []
    for _ in range(rounds):
        for p in photos:
            t0 = time.perf_counter()
            pipeline.embed(p)
            times.append(time.perf_counter() - t0)
    t = np.asarray(times)
    return PipelineLatency(len(photos), float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 95) * 1e3),
                           float(1.0 / t.mean()), faces, max(photos[0].shape[:2]), len(t))


def make_pipeline(recognizer: str, landmarks: str = "detector", backend: str = "auto"):
    """``runtime.FacePipeline`` for ``recognizer`` (the object whose ``embed`` is timed)."""
    from runtime.pipeline import FacePipeline

    return FacePipeline(recognizer=recognizer, landmarks=landmarks, backend=backend)


def time_level(make_caller: Callable[[], Callable[[int], object]], concurrency: int, seconds: float,
               warmup: int = 1, keep_latencies: bool = False) -> dict:
    """N threads, each with its own ``make_caller()``, call it back to back for ``seconds``; latencies and
    throughput of the level (warm-up calls untimed); ``keep_latencies`` adds every latency (``latencies_s``)."""
    callers = [make_caller() for _ in range(concurrency)]
    for call in callers:
        for i in range(warmup):
            call(i)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    start_line = threading.Barrier(concurrency + 1)

    def client(k: int) -> None:
        start_line.wait()
        deadline = time.perf_counter() + seconds
        try:
            i = 0
            while i < MAX_REQUESTS_PER_CLIENT and (i < MIN_REQUESTS_PER_CLIENT or time.perf_counter() < deadline):
                t0 = time.perf_counter()
                callers[k](k + i)
                latencies[k].append(time.perf_counter() - t0)
                i += 1
        except Exception as e:  # reported, never silently lost with the thread
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    start_line.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=seconds + 10 * CLIENT_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError("; ".join(errors) or "a client did not finish")
    lat = np.concatenate([np.asarray(v) for v in latencies])
    row = {"concurrency": concurrency, "requests": int(len(lat)), "wall_s": round(wall, 2),
           "throughput_per_s": round(len(lat) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
           "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2)}
    if keep_latencies:
        row["latencies_s"], row["wall_s"] = lat.tolist(), wall
    return row

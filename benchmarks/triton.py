"""Serving through Triton vs in-process: throughput and p50/p99 latency at concurrency 1, 4 and 16, one run.

A repository is exported here (``export/to_triton.py --backend python``: facekit's runtime in Triton's Python
backend, the CPU route that the bundled server can run) and served by a local ``tritonserver`` on 127.0.0.1.
Two workloads, each timed in-process and through Triton, level by level, one after the other:

- ``recognizer``: one aligned face per request (the preprocessed tensor): the runtime's ONNX Runtime backend
  called from N threads, vs ``triton://…/recognizer`` from N threads (a client each); Triton's dynamic
  batcher merges concurrent requests into batches;
- ``pipeline``: one encoded portrait per request (the JPEG file's bytes): ``FacePipeline.embed`` from N threads,
  vs the ``face_pipeline`` model (decode → detect → warp → embed inside Triton, the recognizer through BLS).

Each of the N client threads sends requests back to back until the time budget is spent (and at least
:data:`MIN_REQUESTS_PER_CLIENT` each); latency is per request, throughput is requests / wall time of the level.
The batch sizes Triton executed come from its statistics endpoint (the change over each level). Before
timing, every portrait and crop is run both ways and the cosines of the embeddings are reported.
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import report as rp
from benchmarks.latency import CLIENT_TIMEOUT_S, SINGLE_PORTRAITS, time_level
from benchmarks.plots import _plt, clients_axis, save_with_machine
from export.triton_repository import ServingOptions, plan_repository, write_repository
from export.triton_server import LocalTritonServer, executed_batches
from runtime.backends.base import load_model
from runtime.pipeline import FacePipeline
from runtime.preprocess import to_model_input

CONCURRENCY = (1, 4, 16)
WORKLOADS = ("recognizer", "pipeline")


class Workloads:
    """The callers of both workloads, in-process and through Triton, on the same inputs."""

    def __init__(self, model: Path, server: LocalTritonServer, photos: list[Path]):
        self.server = server
        self.pipeline = FacePipeline(recognizer=str(model))
        self.model = load_model(str(model))
        self.images = [p.read_bytes() for p in photos]
        spec = self.pipeline.spec
        crops = []
        for data in self.images:
            faces = self.pipeline.detect(data)
            if faces:
                crops.append(self.pipeline.align(data, faces[0].landmarks))
        if not crops:  # no portraits: random crops time the model just as well
            crops = list(np.random.default_rng(0).integers(0, 256, (4, *spec.input_size, 3), dtype=np.uint8))
        self.tensors = [to_model_input(c[None], spec, "BGR") for c in crops]

    def in_process(self, workload: str) -> Callable[[], Callable[[int], object]]:
        if workload == "recognizer":
            return lambda: (lambda i: self.model.run(self.tensors[i % len(self.tensors)]))
        return lambda: (lambda i: self.pipeline.embed(self.images[i % len(self.images)]))

    def through_triton(self, workload: str) -> Callable[[], Callable[[int], object]]:
        if workload == "recognizer":
            def make():
                remote = load_model(self.server.url("recognizer"))
                return lambda i: remote.run(self.tensors[i % len(self.tensors)])
            return make

        def make_pipeline_caller():
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(self.server.grpc_address)

            def call(i: int):
                data = np.frombuffer(self.images[i % len(self.images)], np.uint8)
                inp = grpcclient.InferInput("image", [len(data)], "UINT8")
                inp.set_data_from_numpy(data)
                return client.infer("face_pipeline", [inp], client_timeout=CLIENT_TIMEOUT_S).as_numpy("embeddings")
            return call
        return make_pipeline_caller

    def parity(self) -> dict:
        """Min cosine between in-process and Triton embeddings: every crop (recognizer), every portrait's faces."""
        remote = self.through_triton("recognizer")()
        rec = [_cos(np.ravel(self.model.run(t)[0]), np.ravel(remote(i)[0])) for i, t in enumerate(self.tensors)]
        call = self.through_triton("pipeline")()
        pipe = []
        for i, data in enumerate(self.images):
            local = np.stack([f.embedding for f in self.pipeline.embed(data)])
            pipe += [_cos(a, b) for a, b in zip(local, call(i))]
        return {"recognizer_min_cos": round(min(rec), 7), "pipeline_min_cos": round(min(pipe), 7) if pipe else None,
                "crops": len(rec), "faces": len(pipe)}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[str, int]:
    return {str(b): n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}


def measure(model: Path, data_dir: Path, concurrency=CONCURRENCY, workloads=WORKLOADS, seconds: float = 5.0,
            log: Callable[[str], None] = print) -> dict:
    """Export, serve, check parity, then time every workload × concurrency in-process and through Triton."""
    photos = [data_dir / "photos" / n for n in SINGLE_PORTRAITS if (data_dir / "photos" / n).is_file()]
    if "pipeline" in workloads and not photos:
        raise FileNotFoundError(f"the pipeline workload needs the portraits of {data_dir / 'photos'} "
                                "(set $FACEKIT_DATA)")
    opts = ServingOptions(max_batch=16, queue_delay_us=2000, instances=1, pipeline_instances=2)
    info = rp.machine_info()
    with tempfile.TemporaryDirectory(prefix="facekit-triton-bench-") as tmp:
        repo = write_repository(Path(tmp) / "repo", plan_repository(model, opts=opts, backend="python"))
        log(f"triton: serving {repo} (Python backend, CPU route)")
        with LocalTritonServer(repo) as server:
            work = Workloads(model, server, photos)
            triton_device = served_by(server)
            parity = work.parity()
            log(f"triton: parity {parity}")
            rows = []
            for workload in workloads:
                for n in concurrency:
                    for mode, make in (("in-process", work.in_process(workload)),
                                       ("triton", work.through_triton(workload))):
                        before = executed_batches(server.grpc_address, "recognizer")
                        row = {"workload": workload, "mode": mode, **time_level(make, n, seconds)}
                        if mode == "triton":
                            row["recognizer_batches"] = _delta(executed_batches(server.grpc_address, "recognizer"),
                                                               before)
                        log(f"triton: {workload} c={n} {mode}: {row['throughput_per_s']} req/s, "
                            f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms {row.get('recognizer_batches', '')}")
                        rows.append(row)
    info["load_average_at_end"] = rp.load_average()
    return {"date": _dt.date.today().isoformat(), "machine": info, "models": {"recognizer": rp.shown_path(model)},
            "server": {"device": triton_device, "options": opts.__dict__, "repository": "Python backend (CPU route)"},
            "seconds_per_level": seconds, "parity": parity, "rows": rows, "ratios": ratios(rows)}


def served_by(server: LocalTritonServer) -> str:
    """The Triton backend's own description of what serves the recognizer."""
    remote = load_model(server.url("recognizer"))
    try:
        return remote.device
    finally:
        remote.close()


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Triton / in-process throughput per workload and concurrency (both measured in this run)."""
    by = {(r["workload"], r["mode"], r["concurrency"]): r["throughput_per_s"] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for (workload, mode, n), thr in by.items():
        if mode == "triton" and by.get((workload, "in-process", n)):
            out.setdefault(workload, {})[str(n)] = round(thr / by[(workload, "in-process", n)], 3)
    return out


def to_markdown(result: dict) -> str:
    lines = rp.report_head("facekit through Triton vs in-process", result, f" ({result['machine'].get('os', '')})")
    lines += [f"- server: {result['server']['device']}; {result['server']['repository']}; "
              f"options {result['server']['options']}",
              f"- recognizer: {result['models']['recognizer']}",
              f"- parity (in-process vs Triton): {result['parity']}",
              f"- {result['seconds_per_level']} s per level; N client threads send requests back to back", ""]
    for workload in sorted({r["workload"] for r in result["rows"]}, key=WORKLOADS.index):
        by = {(r["mode"], r["concurrency"]): r for r in result["rows"] if r["workload"] == workload}
        body = []
        for n in sorted({c for _, c in by}):
            a, b = by.get(("in-process", n)), by.get(("triton", n))
            if a is None or b is None:
                continue
            batches = ", ".join(f"{k}×{v}" for k, v in sorted(b.get("recognizer_batches", {}).items(),
                                                            key=lambda kv: int(kv[0])))
            body.append([str(n), f"{a['throughput_per_s']:.1f}", f"{a['p50_ms']:.1f} / {a['p99_ms']:.1f}",
                         f"{b['throughput_per_s']:.1f}", f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}",
                         f"{b['throughput_per_s'] / a['throughput_per_s']:.2f}", batches or "–"])
        unit = "faces" if workload == "recognizer" else "photos"
        lines += [f"## {workload} (one {unit[:-1]} per request)", "",
                  rp.table(["clients", f"in-process {unit}/s", "in-process p50 / p99 ms", f"Triton {unit}/s",
                            "Triton p50 / p99 ms", "Triton / in-process", "recognizer batch size × executions"],
                           body), ""]
    if result.get("plot"):
        lines += [f"![throughput and p99 vs clients]({result['plot']})", ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(result: dict, path: Path) -> str:
    """Throughput and p99 latency vs clients, in-process and Triton, one panel pair per workload."""
    plt = _plt()
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in result["rows"])]
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
    for col, workload in enumerate(workloads):
        for mode, style in (("in-process", "o-"), ("triton", "s--")):
            rows = sorted((r for r in result["rows"] if r["workload"] == workload and r["mode"] == mode),
                          key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in rows]
            axes[0][col].plot(xs, [r["throughput_per_s"] for r in rows], style, label=mode)
            axes[1][col].plot(xs, [r["p99_ms"] for r in rows], style, label=mode)
        axes[0][col].set_title(f"{workload}: requests/s")
        axes[1][col].set_title(f"{workload}: p99 latency (ms)")
        axes[1][col].set_xlabel("concurrent clients")
        clients = sorted({r["concurrency"] for r in result["rows"]})
        for ax in (axes[0][col], axes[1][col]):
            clients_axis(ax, clients)
            ax.legend()
    return save_with_machine(fig, result["machine"], path)


def write(result: dict, results_dir: Path) -> tuple[Path, Path]:
    """``<date>-<machine>-triton.{md,json}`` and the PNG in ``<date>-<machine>-triton/``."""
    stem = rp.report_stem(result["machine"], result["date"]) + "-triton"
    png = plot(result, results_dir / stem / "throughput-latency.png")
    result["plot"] = str(Path(png).relative_to(results_dir))
    return rp.write_md_and_json(results_dir / stem, to_markdown(result), result)

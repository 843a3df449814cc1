"""The sub-commands of ``python benchmarks/run.py`` other than the default run and verification."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from benchmarks import report as rp
from benchmarks.harness import (UsageError, crops_for, log, make_embedder, print_result,
                                resolve_model, verify)
from benchmarks.parity import compare_backends, plan_backends
from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.data import data_root
from evaluation.verification import flip_sum_embeddings
from runtime.messages import first_line


def cmd_verification(args) -> dict:
    pairset = ep.load_pairset(args.command, args.data)
    if args.pairs_per_fold:
        keep = ep.subset_pairs(pairset.pairs, pairset.issame, args.pairs_per_fold)
        pairset = ep.restrict(pairset, keep)
    embedder = make_embedder(resolve_model(args.model), args.backend, args.device, precision=args.precision)
    crops = crops_for(pairset, args, embedder.spec)
    plots_dir = Path(args.plots) if args.plots else None
    result, _, _ = verify(pairset, crops, embedder, args, plots_dir, args.save_embeddings)
    print_result(result, args, rp.verification_table({pairset.name: result}))
    return result


def cmd_identification(args) -> dict:
    from evaluation.identification import evaluate_identification
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
        out["plots"] = {"TPR@FPR": plots.tpr_at_fpr_curve(res.curve, Path(args.plots) / "identification-tpr-fpr.png",
                                                           res.tpr_at_fpr)}
    print_result(out, args, rp.identification_section(out))
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
    print_result(out, args, rp.parity_table(rows))
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
            rows_skipped.append({"backend": plan.label, "skip_reason": f"failed to load: {first_line(e)}"})
    if not embedders:
        return rows_skipped
    rows, _ = compare_backends(embedders, crops.crops, None if pairset is None else pairset.pairs,
                               None if pairset is None else pairset.issame, progress=not args.quiet)
    return [r.to_dict() for r in rows] + rows_skipped


def cmd_latency(args) -> dict:
    from benchmarks import latency

    model = resolve_model(args.model)
    batches = args.batches
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
    print_result(out, args, md)
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

    try:
        result = triton.measure(resolve_model(args.model), data_root(), args.concurrency, args.workloads,
                                args.seconds, log)
    except (TritonServerMissing, TritonExportError) as e:
        raise UsageError(str(e)) from None
    result["command"] = rp.run_command()
    if (results := rp.results_dir(args)) is not None:
        for path in triton.write(result, results):
            log(f"wrote {path}")
    print_result(result, args, triton.to_markdown(result))
    return result


def cmd_training(args) -> dict:
    """Trainer and loader throughput, .rec start-up: ``benchmarks/training_throughput.py``."""
    from benchmarks import training_throughput

    return training_throughput.run(args.only, rp.results_dir(args), Path(args.rec_dir) if args.rec_dir else None,
                                   args.steps, args.old_rev or None)


def cmd_throughput(args) -> dict:
    """``embed`` one photo at a time vs ``embed_many`` (and the indexer): ``benchmarks/pipeline_throughput.py``."""
    from benchmarks import pipeline_throughput as pt
    from runtime.pipeline import FacePipeline

    pipe = FacePipeline(recognizer=str(resolve_model(args.model)), detector=args.detector, landmarks=args.landmarks,
                        aligner=args.aligner, backend=args.backend)
    files = ep.lfw_images(args.data, args.images)
    log(f"throughput: {len(files)} LFW photos, embed vs embed_many")
    info = rp.machine_info()
    out = {"date": _dt.date.today().isoformat(), "command": rp.run_command(),
           "machine": info, "embed": pt.embed_throughput(pipe, files, args.rounds, batch_size=args.batch_size,
                                                         workers=args.workers)}
    if args.indexer_images:
        celeba = data_root() / "celeba"
        log(f"throughput: indexer over {args.indexer_images} celeba/wild photos")
        out["indexer"] = pt.indexer_throughput(celeba / "wild", celeba / "identity_wild.txt", args.indexer_images,
                                               ["in-process", "2 processes", "ray (local)"])
    info["load_average_at_end"] = rp.load_average()
    md = pt.to_markdown(out)
    if (results := rp.results_dir(args)) is not None:
        rp.write_md_and_json(results / (rp.report_stem(info, out["date"]) + "-throughput"), md, out)
    print_result(out, args, md)
    return out


def cmd_landmarks(args) -> dict:
    """NME / failure rate of the aligner and the detector's own points (``benchmarks/landmarks.py``)."""
    from benchmarks import landmarks
    from evaluation.landmarks import format_table

    if not Path(args.data).is_dir():
        raise UsageError(f"{args.data}: landmark folder not found")
    result = landmarks.landmark_accuracy(args.data, aligner=args.aligner, progress=not args.quiet)
    print_result(result, args, format_table(result))
    return result


def cmd_serve(args) -> dict:
    """The HTTP service against the in-process pipeline (``benchmarks/serve.py``)."""
    from benchmarks import serve as sv

    try:
        report, md = sv.serve_report(resolve_model(args.model), args.landmarks, args.concurrency, args.level_seconds,
                                     rp.results_dir(args), client=args.client, progress=log)
    except sv.NoPhotos as e:
        raise UsageError(str(e)) from None
    print_result(report, args, md)
    return report


def cmd_cpu(args) -> dict:
    """CPU backends against ONNX Runtime fp32 and the pipeline ratios (``benchmarks/cpu_backends.py``)."""
    from benchmarks import cpu_backends

    opts = cpu_backends.OPTIONS.build(args, model=resolve_model(args.model), seconds=args.seconds, quiet=args.quiet)
    report = cpu_backends.run(opts, rp.results_dir(args), rp.run_command())
    print_result(report, args, cpu_backends.to_markdown(report))
    return report


def cmd_gallery(args) -> dict:
    """Exact / HNSW / IVF gallery search among synthetic distractors (``benchmarks/gallery.py``)."""
    from benchmarks import gallery as bg
    from benchmarks import gallery_report

    pairset = ep.load_lfw(args.data)
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
    out = bg.run(emb, pairset.identities, sizes=args.sizes, kinds=args.indexes, exact_queries=args.exact_queries,
                 with_crossover=not args.no_crossover, log=log)
    out.update(model=str(model), command=rp.run_command())
    if (results := rp.results_dir(args)) is not None:
        md, _ = gallery_report.write(out, results)
        log(f"wrote {md}")
    print_result(out, args, gallery_report.to_markdown(out))
    return out



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
import sys

from benchmarks import commands as cm
from benchmarks import cpu_backends
from benchmarks import gallery
from benchmarks import large_photos
from benchmarks import latency
from benchmarks import serve
from benchmarks import training_throughput
from benchmarks import triton
from benchmarks.default_run import cmd_default
from benchmarks.harness import DEFAULT_DATA, DEFAULT_PARITY_PER_FOLD, VERIFICATION_KINDS, UsageError, log
from evaluation.data import data_root
from evaluation.errors import DatasetError
from runtime import gallery_index
from runtime.field_options import add_list_option

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
    common.add_argument("--detector", help="detector ONNX (default: the shipped RetinaFace-MobileNet0.25, runtime/models/detector.onnx)")
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
    _add_accuracy_commands(sub, sub_common)
    _add_speed_commands(sub, sub_common)
    return p


def _add_accuracy_commands(sub, sub_common: argparse.ArgumentParser) -> None:
    """Verification, identification, parity and landmark sub-commands."""
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
    add_list_option(s, "--batches", latency.BATCH_SIZES, "recognizer batch sizes", minimum=1)
    s.add_argument("--all-backends", action="store_true", help="every backend available for the model")
    s.add_argument("--no-pipeline", action="store_true", help="skip the end-to-end pipeline timing")
    s = sub.add_parser("landmarks", parents=[sub_common],
                       help="aligner and detector NME on a landmark set (benchmarks/landmarks.py)")
    s.add_argument("--data", help="folder of images with .pts5 files (default: $FACEKIT_DATA/landmarks_300w/test)")


def _add_speed_commands(sub, sub_common: argparse.ArgumentParser) -> None:
    """Throughput, serving, CPU-backend, gallery, large-photo and training sub-commands."""
    s = sub.add_parser("serve", parents=[sub_common], help="the HTTP service vs the in-process pipeline")
    add_list_option(s, "--concurrency", serve.CONCURRENCY, "client counts", minimum=1)
    s.add_argument("--level-seconds", type=float, default=serve.LEVEL_SECONDS,
                   help=f"seconds of load per side and concurrency (default {serve.LEVEL_SECONDS:g})")
    s.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: plain HTTP/1.1 on asyncio streams (default) or httpx")
    s = sub.add_parser("cpu", parents=[sub_common], help="OpenVINO f32/bf16/int8 vs ONNX Runtime fp32; "
                       "FacePipeline() vs backend='onnxruntime' (benchmarks/cpu_backends.py)")
    cpu_backends.OPTIONS.add(s)
    s.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS, help="print, write no files")
    large_photos.add_arguments(sub.add_parser("large-photos", help="50–200 MP JPEGs: full vs reduced decode, "
                                                                   "pipeline time, faces, peak RSS"))
    s = sub.add_parser("triton", parents=[sub_common], help="throughput, p50/p99 latency through Triton vs "
                                                            "in-process (benchmarks/triton.py)")
    add_list_option(s, "--concurrency", triton.CONCURRENCY, "concurrent clients per level", minimum=1)
    add_list_option(s, "--workloads", triton.WORKLOADS, "what is served", choices=triton.WORKLOADS)
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
    add_list_option(s, "--only", training_throughput.PARTS, "what to measure", choices=training_throughput.PARTS)
    s.add_argument("--rec-dir", help="folder for the generated MS1MV2-shaped .idx/.rec (default: the facekit cache)")
    s.add_argument("--steps", type=int, default=30, help="ranks: training steps per run")
    s.add_argument("--old-rev", default="main", help="rec-open: git revision of the reader to compare with ('' = none)")
    s.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS, help="print, write no files")
    s = sub.add_parser("gallery", parents=[sub_common], help="exact / HNSW / IVF search among synthetic distractors")
    s.add_argument("--data", help="LFW folder (default $FACEKIT_DATA/lfw)")
    add_list_option(s, "--sizes", gallery.DEFAULT_SIZES, "distractor counts", minimum=1)
    add_list_option(s, "--indexes", gallery.DEFAULT_INDEXES, "index kinds (runtime.gallery_index)",
                    choices=gallery_index.KINDS)
    s.add_argument("--exact-queries", type=int, default=gallery.EXACT_QUERIES,
                   help=f"queries timed on the exact single-query path (default {gallery.EXACT_QUERIES})")
    s.add_argument("--no-crossover", action="store_true", help="skip the small-size exact vs HNSW timing")
    s.add_argument("--results", default=argparse.SUPPRESS, help="report folder (default benchmarks/results)")
    s.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS, help="print, write no files")


def _default_data(args) -> None:
    """Fill in ``--data`` from ``$FACEKIT_DATA`` where a sub-command has a default data set."""
    if getattr(args, "data", "") is not None:
        return
    kind = args.command if args.command != "parity" else args.kind
    sub = "landmarks_300w/test" if args.command == "landmarks" else DEFAULT_DATA.get(
        "lfw" if args.command in ("identification", "throughput", "gallery") else kind)
    if sub is None:
        raise UsageError(f"{args.command}: give --data (there is no default for {kind})")
    args.data = str(data_root() / sub)


def commands() -> dict:
    """Sub-command name → the function that runs it (the verification kinds share ``cmd_verification``)."""
    return {"identification": cm.cmd_identification, "parity": cm.cmd_parity, "latency": cm.cmd_latency,
            "landmarks": cm.cmd_landmarks, "large-photos": large_photos.run, "triton": cm.cmd_triton,
            "throughput": cm.cmd_throughput, "training": cm.cmd_training, "serve": cm.cmd_serve, "cpu": cm.cmd_cpu,
            "gallery": cm.cmd_gallery}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _default_data(args)
        if args.command is None:
            cmd_default(args)
        elif args.command in VERIFICATION_KINDS:
            cm.cmd_verification(args)
        else:
            commands()[args.command](args)
    except UsageError as e:
        log(f"error: {e}")
        return 2
    except (DatasetError, FileNotFoundError) as e:
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

"""What every benchmark command shares: the shipped model, embedders for any model file, aligned crops of a
pair set, one verification run with its plots, and how results are printed."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import report as rp
from benchmarks.parity import ENGINE_SUFFIXES, BackendEmbedder, BackendPlan, TorchEmbedder
from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.data import PROJECT_ROOT as ROOT
from evaluation.verification import evaluate, flip_sum_embeddings
from runtime.backends.onnxruntime import cuda_usable
from runtime.cpu import usable_cores
from runtime.files import atomic_write
from runtime.shipped import RECOGNIZER as SHIPPED_RECOGNIZER
from train.model_files import is_checkpoint

VERIFICATION_KINDS = ("lfw", "cfp-fp", "cfp-ff", "bin")
#: Where each data set lives under $FACEKIT_DATA (the default run's layout).
DEFAULT_DATA = {name.lower(): folder for name, (folder, _) in ep.STANDARD_SETS.items()}
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
    if is_checkpoint(model):
        return TorchEmbedder(model, device=device or "cpu", batch_size=batch_size)
    if model.suffix.lower() in ENGINE_SUFFIXES:
        return BackendEmbedder(model, backend="tensorrt", batch_size=batch_size)
    if backend == "openvino":
        return BackendPlan(f"openvino-cpu {precision}", "openvino", str(model), "cpu",
                           precision=precision).build(batch_size, for_dataset)
    if for_dataset and backend in ("auto", "onnxruntime") and (device == "cpu" or (device is None and not cuda_usable())):
        emb = BackendEmbedder(model, backend="onnxruntime", device="cpu", batch_size=batch_size,
                              threads=1 if usable_cores() > 1 else None)
        emb.workers = min(4, usable_cores())
        return emb
    return BackendEmbedder(model, backend=backend, device=device, batch_size=batch_size)


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
    if res.roc is not None:
        files[f"{name} ROC"] = plots.roc_curves({name: res.roc}, plots_dir / f"{name}-roc.png",
                                                title=f"{name} ROC")
    return files


def print_result(result: dict, args, markdown: str) -> None:
    if args.json:
        print(json.dumps(result, default=rp._json_default))
    else:
        print(markdown)


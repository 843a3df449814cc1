"""Build a TensorRT engine from a facekit ONNX model (TensorRT 10.x / 11.x), cached and checked.

    python export/to_trt.py runtime/models/recognizer.onnx --out recognizer.engine --opt-batch 32 --check 64

Precision comes from the ONNX graph (export fp16 / INT8 Q/DQ with export/to_onnx.py first): the network is
strongly typed. One optimization profile (``--min-batch`` / ``--opt-batch`` / ``--max-batch``), a timing cache
file, and a JSON sidecar ``<engine>.json`` (TensorRT version, GPU, compute capability, shapes, precision,
source ONNX SHA-256, facekit metadata). An existing engine is reused only when its sidecar matches all of
those; otherwise it is rebuilt (``--rebuild auto``, default) or refused (``--rebuild never``, exit 1).
``--check N`` runs N inputs through the engine and ONNX Runtime and fails (exit 1) beyond tolerance; its
last stdout line is ``parity: max_abs=… min_cos=…``. Without TensorRT: one line on how to install it, exit 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.cli import doc_parser
from export.trt_build import BuildOptions, StaleEngineError, TensorRTMissing, ensure_engine, require_tensorrt
from runtime.field_options import FieldOptions

#: Minimum cosine of the engine against ONNX Runtime on the same graph, by precision (fp32 allows TF32).
CHECK_MIN_COS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
EXIT_NO_TENSORRT = 3
BUILD = FieldOptions(BuildOptions)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("onnx", type=Path, help="source ONNX model (from export/to_onnx.py)")
    p.add_argument("--out", type=Path, help="engine file (default: the ONNX path with .engine)")
    BUILD.add(p)
    p.add_argument("--timing-cache", type=Path, help="timing cache file (default: <engine stem>.timing.cache)")
    p.add_argument("--rebuild", choices=("auto", "always", "never"), default="auto",
                   help="stale/foreign engine: rebuild (auto), refuse (never); always: rebuild anyway")
    p.add_argument("--check", type=int, default=0, metavar="N", help="compare with ONNX Runtime on N inputs")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose build log")
    return p


def check_engine(engine: Path, onnx_path: Path, n: int, device: int, precision: str) -> int:
    """Run ``n`` inputs through the engine and ONNX Runtime; print per-output figures and the parity line."""
    from export import parity
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.metadata import preprocess_spec
    from runtime.preprocess import RECOGNIZER_SPEC

    trt_model = TensorRTBackend(str(engine), device=device)
    try:
        ort_model = OnnxRuntimeBackend(str(onnx_path), device="cuda")
    except RuntimeError:
        ort_model = OnnxRuntimeBackend(str(onnx_path), device="cpu")
    meta = trt_model.metadata
    spec = preprocess_spec(meta) if meta.get("preprocess") else RECOGNIZER_SPEC
    crops, how = parity.parity_crops(spec, n, meta.get("task", "recognition"), geometry=meta)
    lo, hi = trt_model.batch_range
    batches = sorted({max(lo, min(hi, b)) for b in (1, min(n, 7), n)})
    print(f"check: {how}; TensorRT ({trt_model.device}) vs ONNX Runtime ({ort_model.device}), batches {batches}")
    results = parity.check_parity(ort_model.run, trt_model.run, crops, spec, batches)
    for r in results:
        print(f"batch {r.batch:>4}: max |Δ| {r.max_abs:.3g}  min cos {r.min_cos:.8f}  mean cos {r.mean_cos:.8f}")
    problems = parity.failures(results, parity.Tolerance(CHECK_MIN_COS.get(precision, 0.999)))
    print(parity.parity_line(results))
    if problems:
        print("error: engine disagrees with ONNX Runtime: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_tensorrt()
    except TensorRTMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    if not args.onnx.is_file():
        print(f"error: {args.onnx}: ONNX file not found", file=sys.stderr)
        return 2
    out = args.out or args.onnx.with_suffix(".engine")
    cache = args.timing_cache or out.with_suffix(".timing.cache")
    try:
        opts = BUILD.build(args)
        side, status, reasons = ensure_engine(args.onnx, out, opts, args.rebuild, cache, args.device, args.verbose)
    except StaleEngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    build = side["build"]
    if reasons:
        print("rebuilt stale engine: " + "; ".join(reasons))
    shapes = build["profile"]
    print(f"{status}: {out} ({build['precision']}, TensorRT {build['tensorrt_version']}, {build['gpu_name']} "
          f"sm {build['compute_capability']}, batch {shapes['min'][0]}/{shapes['opt'][0]}/{shapes['max'][0]}, "
          f"key {side['key'][:12]}…)")
    if args.check:
        return check_engine(out, args.onnx, args.check, args.device, build["precision"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

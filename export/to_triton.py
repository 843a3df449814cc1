"""Write a Triton Inference Server model repository for facekit models (configs derived from the models).

    python export/to_triton.py --recognizer runtime/models/recognizer.onnx --out model_repository/
    python export/to_triton.py --recognizer r.onnx --detector d.onnx --engine r.sm90.engine --out repo/
    python export/to_triton.py --recognizer r.onnx --backend python --out repo/   # CPU route, Python backend

Writes ``<name>/config.pbtxt`` and ``<name>/1/model.onnx`` (or ``model.sm<cc>.plan`` per engine, mapped by
``cc_model_filenames``) for the recognizer (and detector), plus ``face_pipeline`` (Triton's Python backend
running facekit's runtime: image bytes in → boxes, scores, landmarks, embeddings out; the recognizer through
BLS). Names, dtypes, dims and ``max_batch_size`` come from the models; the facekit metadata goes into each
config's ``parameters``. ``--backend python`` serves the ONNX files with facekit's runtime in the Python
backend (for servers without the onnxruntime backend). Engines (from export/to_trt.py) are matched to their
ONNX by SHA-256. Serve with: tritonserver --model-repository=OUT (see the README for the container command).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.cli import doc_parser
from export.triton_repository import ServingOptions, TritonExportError, plan_repository, write_repository
from runtime.field_options import FieldOptions
from runtime.shipped import RECOGNIZER as DEFAULT_RECOGNIZER

SERVING = FieldOptions(ServingOptions)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("--recognizer", type=Path, default=DEFAULT_RECOGNIZER,
                   help="recognizer ONNX with facekit metadata (default: runtime/models/recognizer.onnx)")
    p.add_argument("--detector", type=Path, help="detector ONNX (RetinaFace/SCRFD); also used by face_pipeline "
                                                  "(default there: the shipped RetinaFace-MobileNet0.25, runtime/models/detector.onnx)")
    p.add_argument("--engine", type=Path, action="append", default=[],
                   help="TensorRT engine built from --recognizer or --detector (repeat: one per compute capability)")
    p.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--backend", choices=("onnxruntime", "python"), default="onnxruntime",
                   help="how ONNX models are served: Triton's onnxruntime backend, or facekit's runtime in the "
                        "Python backend (CPU route)")
    SERVING.add(p)
    p.add_argument("--no-pipeline", action="store_true", help="do not write the face_pipeline model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.backends.base import ModelLoadError

    try:
        opts = SERVING.build(args)
        models = plan_repository(args.recognizer, args.detector, args.engine, opts, args.backend,
                                 pipeline=not args.no_pipeline)
        out = write_repository(args.out, models, force=args.force)
    except (TritonExportError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m in models:
        kind = m.config.get("platform") or m.config["backend"]
        batch = m.config["max_batch_size"]
        print(f"{out / m.name}: {kind}, max_batch_size {batch}, files {', '.join(sorted(m.files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

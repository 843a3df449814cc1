"""Export a facekit model to ONNX (fp32, fp16 or INT8 Q/DQ) and prove it matches PyTorch.

    python export/to_onnx.py --arch mobilefacenet --out /tmp/mfn.onnx              # random init (testing)
    python export/to_onnx.py --checkpoint runs/x/best.pt --out runtime/models/recognizer.onnx
    python export/to_onnx.py --checkpoint runs/x/best.pt --fp16 --out rec_fp16.onnx
    python export/to_onnx.py --checkpoint runs/x/best.pt --fp16-weights --out rec.onnx   # fp32, half the size
    python export/to_onnx.py --checkpoint runs/x/best.pt --int8 --calib aligned/ --pairs $FACEKIT_DATA/lfw \\
        --out rec_int8.onnx
    python export/to_onnx.py --checkpoint runs/aligner_default/last.pt --out runtime/models/aligner.onnx  # aligner

One self-contained file (no external data) with a dynamic batch axis, opset 17 unless ``--opset``, checked
by ``onnx.checker``, carrying facekit metadata (task, preprocessing, arch, embedding size, checkpoint
SHA-256, precision, opset, threshold). Then ONNX Runtime (CPU) runs it against the PyTorch fp32 model at
each ``--batch`` size on real aligned faces when available (else generated images); beyond tolerance the
file is not written and the exit status is 1. The last stdout line is ``parity: max_abs=… min_cos=…``.

INT8: static calibration on ``--calib`` (a folder of aligned crops), per-channel symmetric weights, the
first and last layers kept float unless ``--no-keep-float-ends``; with ``--pairs`` (LFW folder, CFP folder,
``.bin`` or npz) the INT8 verification accuracy is measured against fp32 and the export refuses (exit 1)
when it drops more than ``--max-drop`` points or the embeddings' cosine falls under ``--int8-min-cos``,
unless ``--force``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.cli import doc_parser
from runtime.field_options import comma_list, joined
from runtime.files import publish, sha256_file, temp_beside

ALIGNER_ARCHS = ("hourglass",)
#: Exception types (by name, to avoid importing their modules) reported as one-line input errors.
USER_ERRORS = ("CheckpointError", "ModelLoadError", "ImageError", "DatasetError", "BinFormatError", "ModelMetadataError")


class ExportError(RuntimeError):
    """A failure the CLI reports in one line (exit status 1)."""


#: batch sizes the exported model is checked at against its source
PARITY_BATCHES = (1, 7, 64)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="random-init backbone (mobilefacenet, iresnet50, …, or 'hourglass' for the aligner)")
    src.add_argument("--checkpoint", type=Path, help="training checkpoint: a recognizer's (train/arcface.py) or an "
                     "aligner's (train/aligner.py's last.pt)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx file")
    p.add_argument("--embedding-size", type=int, default=512, help="with --arch (default 512)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 weights/compute, fp32 inputs and outputs")
    prec.add_argument("--int8", action="store_true", help="INT8 Q/DQ (static calibration; needs --calib)")
    prec.add_argument("--fp16-weights", action="store_true",
                      help="fp32 compute with the weights stored as fp16 (half the file; ONNX Runtime casts them "
                           "back when it loads the model)")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    p.add_argument("--batch", nargs="+", type=comma_list(int, minimum=1), default=[PARITY_BATCHES],
                   help=f"parity batch sizes (default {joined(PARITY_BATCHES)})")
    p.add_argument("--faces", type=Path, help="folder of aligned crops for the parity check "
                   "(default: $FACEKIT_DATA/lfw photos, detected and warped; else generated images)")
    p.add_argument("--threshold", type=float, help="cosine threshold to store (default: the checkpoint config's)")
    p.add_argument("--min-cos", type=float, help="parity tolerance: minimum cosine vs PyTorch "
                   "(default 0.99999 fp32, 0.9999 fp16-weights, 0.999 fp16, 0.98 int8)")
    p.add_argument("--seed", type=int, default=0, help="random init / generated inputs seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch and ONNX Runtime (0: default)")
    q = p.add_argument_group("INT8")
    q.add_argument("--calib", type=Path, help="folder of aligned face crops for calibration")
    q.add_argument("--calib-limit", type=int, default=256, help="at most this many calibration crops (default 256)")
    q.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    q.add_argument("--keep-float-ends", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the first and last weighted layers in float (default: yes)")
    q.add_argument("--exclude", nargs="*", default=[], metavar="NODE", help="more node names to keep in float")
    q.add_argument("--pairs", type=Path, help="held-out pairs for the accuracy guard: LFW folder, CFP folder, .bin or npz")
    q.add_argument("--pairs-kind", default="auto", choices=("auto", "lfw", "cfp-fp", "cfp-ff", "bin", "npz"))
    q.add_argument("--pairs-limit", type=int, help="use at most this many pairs (spread over the protocol)")
    q.add_argument("--max-drop", type=float, default=0.3, help="allowed accuracy drop in points (default 0.3)")
    q.add_argument("--int8-min-cos", type=float, default=0.98, help="minimum INT8 vs fp32 embedding cosine (default 0.98)")
    q.add_argument("--force", action="store_true", help="write the INT8 model even when the guard refuses it")
    return p


def load_source(args):
    from export import onnx_export as ox

    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise ExportError(f"{args.checkpoint}: checkpoint not found")
        return ox.from_checkpoint(args.checkpoint, threshold_cosine=args.threshold)
    if args.arch.lower() in ALIGNER_ARCHS:
        import torch

        torch.manual_seed(args.seed)
        return ox.aligner_source({})
    src = ox.from_arch(args.arch, args.embedding_size, seed=args.seed)
    if args.threshold is not None:
        src.threshold_cosine = args.threshold
    return src


def _prepare(args, source, crops):
    """The fp32 graph of ``source`` with its metadata (BatchNorm statistics estimated first for a random init)."""
    from export import onnx_export as ox

    if source.random_init:
        n_bn = ox.recalibrate_batchnorm(source.model, crops[:16], source.spec)
        print(f"random init: BatchNorm statistics of {n_bn} layers estimated on 16 parity inputs")
        if args.int8:
            print("note: random-init deep networks are chaotic (one grey level of input noise already moves their "
                  "output to cosine ~0.9), so INT8 parity is only meaningful for trained checkpoints")
    proto = ox.export_fp32(source, args.opset or ox.DEFAULT_OPSET)
    if args.simplify:
        before = len(proto.graph.node)
        proto = ox.simplify(proto)
        print(f"onnxslim: {before} → {len(proto.graph.node)} nodes")
    meta = ox.build_metadata(source, "fp32", args.opset or ox.DEFAULT_OPSET)
    ox.set_metadata(proto, meta)
    return proto, meta


def _candidate(args, source, proto, meta: dict, crops, temps: list[Path]):
    """The file of the requested precision, written beside ``args.out`` (in ``temps``), and the INT8 guard
    report (None for the other precisions)."""
    from export import onnx_export as ox

    fp32_path = temp_beside(args.out, ".fp32.onnx")
    temps.append(fp32_path)
    ox.save_onnx(proto, fp32_path)
    if args.int8:
        return quantize(args, source, fp32_path, meta, crops, temps)
    if not (args.fp16 or args.fp16_weights):
        return fp32_path, None
    from export.fp16 import fp16_overflow_count, to_fp16, with_fp16_weights

    if args.fp16:
        over = fp16_overflow_count(proto)
        if over:
            print(f"warning: {over} weights exceed the fp16 range and are clamped")
        converted, extra, tag = to_fp16(proto), {"precision": "fp16"}, ".fp16.onnx"
    else:
        converted, extra, tag = with_fp16_weights(proto), {"weight_storage": "fp16"}, ".fp16w.onnx"
    ox.set_metadata(converted, {**meta, **extra})
    candidate = temp_beside(args.out, tag)
    temps.append(candidate)
    ox.save_onnx(converted, candidate)
    return candidate, None


def _check(args, source, candidate: Path, crops, batches, precision: str, guard):
    """Parity of ``candidate`` (through the runtime's ONNX Runtime backend) against PyTorch; the results and
    the reasons to refuse it (empty when it passes)."""
    from export import onnx_export as ox
    from export import parity
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(str(candidate), device="cpu", **({"threads": args.threads} if args.threads else {}))
    if backend.metadata != ox.read_metadata(candidate):
        raise ExportError("metadata read back through the runtime differs from what was written")
    results = parity.check_parity(lambda x: ox.torch_forward(source.model, x), backend.run, crops,
                                  source.spec, batches)
    tol = parity.TOLERANCES["fp16-weights" if args.fp16_weights else precision]
    if args.min_cos is not None:
        tol = parity.Tolerance(args.min_cos, tol.max_rel)
    problems = parity.failures(results, tol)
    for r in results:
        print(f"batch {r.batch:>4}: max |Δ| {r.max_abs:.3g} (max |ref| {r.ref_max_abs:.3g})  "
              f"min cos {r.min_cos:.8f}  mean cos {r.mean_cos:.8f}")
    if guard is not None and not guard.passed and not args.force:
        problems += guard.reasons
    return results, problems


def run(args) -> int:
    import torch

    from export import parity

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.int8 and args.calib is None:
        raise ExportError("--int8 needs --calib DIR (a folder of aligned face crops)")
    batches = [b for sizes in args.batch for b in sizes]
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = load_source(args)
    crops, how = parity.parity_crops(source.spec, max(max(batches), 16), source.task, faces_dir=args.faces,
                                     seed=args.seed, geometry=source.extra_metadata)
    print(f"model: {source.task} {source.arch}" + (f" from {source.checkpoint}" if source.checkpoint else " (random init)"))
    print(f"parity inputs: {how}")
    proto, meta = _prepare(args, source, crops)
    temps: list[Path] = []
    try:
        candidate, guard = _candidate(args, source, proto, meta, crops, temps)
        results, problems = _check(args, source, candidate, crops, batches, precision, guard)
        if problems:
            print(parity.parity_line(results))
            raise ExportError(f"{precision} export of {source.arch} rejected, {args.out} not written: "
                              + "; ".join(problems))
        publish(candidate, args.out)
        temps.remove(candidate)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({precision}, opset {meta['opset']}, {size / 1e6:.1f} MB, "
          f"sha256 {sha256_file(args.out)[:16]}…, {time.perf_counter() - t0:.0f} s)")
    print(parity.parity_line(results))
    return 0


def quantize(args, source, fp32_path: Path, meta: dict, crops, temps: list[Path]):
    """INT8 Q/DQ candidate file and its guard report (the guard's figures go into the metadata)."""
    import onnx

    from export import onnx_export as ox
    from export.calibration import load_crop_folder
    from export.quantize import accuracy_guard, load_pair_crops, quantize_int8
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    calib = load_crop_folder(args.calib, tuple(source.spec.input_size), limit=args.calib_limit)
    print(f"int8: calibrating on {len(calib)} crops from {args.calib} ({args.calib_method})")
    candidate = temp_beside(args.out, ".int8.onnx")
    temps.append(candidate)
    info = quantize_int8(fp32_path, candidate, calib, source.spec, keep_float_ends=args.keep_float_ends,
                         exclude=args.exclude, method=args.calib_method, metadata=meta)
    print(f"int8: {info['quantize_nodes']} QuantizeLinear / {info['dequantize_nodes']} DequantizeLinear nodes; "
          f"kept float: {', '.join(info['kept_float']) or 'none'}")
    pairs = None
    if args.pairs is not None:
        pairs = load_pair_crops(args.pairs, args.pairs_kind, source.spec).subset(args.pairs_limit)
    else:
        print("int8: WARNING no --pairs given: verification accuracy is NOT measured, only embedding cosines")
    threads = {"threads": args.threads} if args.threads else {}
    guard = accuracy_guard(OnnxRuntimeBackend(str(fp32_path), device="cpu", **threads),
                           OnnxRuntimeBackend(str(candidate), device="cpu", **threads), source.spec,
                           pairs=pairs, crops=crops if pairs is None else None,
                           max_drop_points=args.max_drop, min_cos=args.int8_min_cos, progress=True)
    for line in guard.lines():
        print(line)
    if not guard.passed:
        print("int8 guard: REFUSED: " + "; ".join(guard.reasons) + (" (writing anyway: --force)" if args.force else ""))
    q = onnx.load(str(candidate))
    q_meta = ox.read_metadata(q)
    q_meta["int8"] = {**q_meta.get("int8", {}), "guard": {**guard.to_dict(), "passed": guard.passed,
                                                          "pairs_source": str(args.pairs) if args.pairs else None}}
    ox.set_metadata(q, q_meta)
    ox.save_onnx(q, candidate)
    return candidate, guard


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # bad input (missing/corrupt files, wrong crop sizes): one line, no traceback
        if isinstance(e, (FileNotFoundError, ValueError)) or type(e).__name__ in USER_ERRORS:
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

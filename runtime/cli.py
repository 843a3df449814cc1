"""Command line: ``python -m runtime {detect,compare,matrix,enroll,identify,index,serve} ...``.

Exit status 0 on success (a picture without a face is a result, not an error); 2 with one line on stderr
for unusable input (unreadable image, missing or foreign model, bad gallery); never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from . import files
from .backends.base import ModelLoadError
from .detector import DEFAULT_SCORE_THRESHOLD
from .faces import NoFaceError
from .gallery import LOG_LOAD_MIN_ROWS, Gallery, GalleryError
from .image_io import ImageError, decoder_messages_silenced, load_image_scaled
from .index_cli import add_index_command
from .indexer import IndexingError
from .messages import one_line
from .metadata import ModelMetadataError
from .photo_lists import iter_images
from .pipeline import FacePipeline
from .progress import progress_bar
from .serve.config import ServeError, add_serve_arguments

EXIT_BAD_INPUT = 2
#: ``matrix`` shows a progress bar (on a terminal) from this many photos on.
MATRIX_BAR_MIN = 20


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


#: errors caused by the user's input: one line on stderr, exit status 2
USER_ERRORS = (CliError, ImageError, ModelLoadError, ModelMetadataError, ServeError, GalleryError, IndexingError,
               FileNotFoundError, IsADirectoryError, PermissionError)


# ------------------------------------------------------------------------------------------- helpers


def _pipeline(args, need_recognizer: bool, model_options: dict | None = None):
    pipe = FacePipeline(recognizer=args.recognizer, detector=args.detector, landmarks=args.landmarks,
                        aligner=args.aligner, backend=args.backend, threshold=args.threshold,
                        score_threshold=args.score_threshold, model_options=model_options)
    if need_recognizer:
        pipe.recognizer  # load now, so a missing default model is reported before any work
    return pipe


def _print_result(args, data: Any, text: str | Sequence[str]) -> int:
    """Print a command's result: ``data`` as one JSON line with ``--json``, else ``text`` (a line or lines).
    Returns the exit status, 0."""
    if args.json:
        print(json.dumps(data))
    else:
        for line in [text] if isinstance(text, str) else text:
            print(line)
    return 0


def _fmt(v: float | None, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def draw_faces(image_bgr: np.ndarray, faces, scale: float = 1.0) -> np.ndarray:
    """A copy of ``image_bgr`` with boxes, scores and the 5 landmarks drawn (coordinates × ``scale``)."""
    out = image_bgr.copy()
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255)]  # BGR per landmark
    for f in faces:
        x1, y1, x2, y2 = (int(round(v * scale)) for v in f.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 200, 0), thick)
        cv2.putText(out, f"{f.score:.2f}", (x1, max(0, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick,
                    (0, 200, 0), thick)
        if np.isfinite(f.landmarks).all():
            for (x, y), c in zip(f.landmarks, colors):
                cv2.circle(out, (int(round(x * scale)), int(round(y * scale))), thick + 1, c, -1)
    return out


def _encode_image(path: Path, image: np.ndarray) -> bytes:
    ext = path.suffix.lower() or ".jpg"
    ok, buf = cv2.imencode(ext if ext in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".png", image)
    if not ok:
        raise CliError(f"{path}: cannot encode the annotated image")
    return buf.tobytes()


# ------------------------------------------------------------------------------------------ commands


def cmd_detect(args) -> int:
    pipe = _pipeline(args, need_recognizer=False)
    image = load_image_scaled(args.image)  # a large JPEG comes decoded reduced; boxes are the file's pixels
    faces = pipe.detect(image)
    if args.out:
        annotated = draw_faces(image.image, faces, scale=image.scale)
        files.atomic_write_bytes(args.out, _encode_image(Path(args.out), annotated), make_parents=False)
    lines = [f"{args.image}: {len(faces)} face(s)" if faces else f"{args.image}: no face found"]
    lines += [f"  #{i}: score {f.score:.3f}  box [{', '.join(f'{v:.0f}' for v in f.box)}]" for i, f in enumerate(faces)]
    lines += [f"annotated image written to {args.out}"] if args.out else []
    return _print_result(args, [f.to_dict() for f in faces], lines)


def cmd_compare(args) -> int:
    pipe = _pipeline(args, need_recognizer=True)
    try:
        r = pipe.compare(args.a, args.b)
        result = {"similarity": round(r.similarity, 6), "same": r.same}
        text = (f"similarity {r.similarity:.4f} (threshold {_fmt(r.threshold)}): "
                + ("same person" if r.same else "different people" if r.same is False else "no verdict"))
    except NoFaceError as e:  # a result, not an error
        result = {"similarity": None, "same": None, "error": str(e)}
        text = str(e)
    return _print_result(args, result, text)


def cmd_matrix(args) -> int:
    photos = iter_images(args.folder)
    if not photos:
        raise CliError(f"{args.folder}: no images (jpg, png, bmp, webp, tif) in this folder")
    pipe = _pipeline(args, need_recognizer=True)

    emb, missing = [], []
    with progress_bar(len(photos), desc="embedding", enabled=None if len(photos) >= MATRIX_BAR_MIN else False) as bar:
        for p in photos:
            try:
                emb.append(pipe.subject_face(p).embedding)
            except (NoFaceError, ImageError) as e:
                emb.append(None)
                missing.append(f"{p.name}: {getattr(e, 'reason', None) or 'no face found'}")
            bar.update(1)
    dim = next((len(e) for e in emb if e is not None), 1)
    mat = np.stack([e if e is not None else np.full(dim, np.nan, np.float32) for e in emb])
    sim = mat @ mat.T
    names = [p.name for p in photos]
    files.atomic_write_bytes(args.out, similarity_heatmap_png(sim, names, pipe.threshold), make_parents=False)
    result = {"names": names, "similarity": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in sim],
              "skipped": missing}
    return _print_result(args, result, [f"{len(photos)} images, similarity matrix written to {args.out}",
                                        *(f"  skipped {m}" for m in missing)])


def cmd_enroll(args) -> int:
    pipe = _pipeline(args, need_recognizer=True)
    path = Path(args.gallery)
    gallery = _load_gallery(path, pipe) if path.exists() else Gallery()
    added = gallery.enroll(args.name, [str(p) for p in args.images], pipeline=pipe)
    gallery.save(path)
    print(f"enrolled {added} face(s) for {args.name!r}; {path} holds {len(gallery)} people")
    return 0


def _load_gallery(path, pipe):
    """``Gallery.load``; says on stderr how long a large one took."""
    gallery = Gallery.load(path, pipeline=pipe)
    info = gallery.load_info
    if info["rows"] >= LOG_LOAD_MIN_ROWS:
        print(f"{path}: {info['rows']} embeddings loaded in {info['seconds']:.1f} s (index {info['index']})",
              file=sys.stderr)
    return gallery


def cmd_identify(args) -> int:
    pipe = _pipeline(args, need_recognizer=True)
    gallery = _load_gallery(args.gallery, pipe)
    matches = gallery.identify(args.image, top_k=args.top_k, pipeline=pipe)
    lines = [f"{'unknown' if n is None else n}\t{s:.4f}" for n, s in matches] or f"{args.image}: no face found"
    return _print_result(args, [{"name": n, "similarity": round(s, 6)} for n, s in matches], lines)


def cmd_serve(args) -> int:
    from .serve.server import serve  # the web framework loads only when a server starts

    return serve(args, lambda options: _pipeline(args, need_recognizer=True, model_options=options))


def similarity_heatmap_png(sim: np.ndarray, names: Sequence[str], threshold: float | None = None) -> bytes:
    """A PNG heat map of a square similarity matrix, names on both axes and the value in each cell."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("the matrix command needs matplotlib (pip install matplotlib)") from None
    n = len(names)
    side = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        masked = np.ma.masked_invalid(sim)
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        im = ax.imshow(masked, cmap=cmap, vmin=-1.0 if np.nanmin(sim, initial=0) < 0 else 0.0, vmax=1.0)
        ax.set_xticks(range(n), labels=names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels=names, fontsize=8)
        if n <= 40:
            for r in range(n):
                for c in range(n):
                    v = sim[r, c]
                    txt = "–" if np.isnan(v) else f"{v:.2f}"
                    same = threshold is not None and not np.isnan(v) and v >= threshold
                    ax.text(c, r, txt, ha="center", va="center", fontsize=7,
                            color="black" if (not np.isnan(v) and v > 0.6) else "white",
                            fontweight="bold" if same else "normal")
        title = "cosine similarity of the subject face"
        if threshold is not None:
            title += f" (bold: ≥ threshold {threshold:.3f})"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- parser


def _model_options() -> argparse.ArgumentParser:
    """The options every face command shares: which models, backend and thresholds."""
    models = argparse.ArgumentParser(add_help=False)
    g = models.add_argument_group("models")
    g.add_argument("--recognizer", help="recognizer model (default: runtime/models/recognizer.onnx)")
    g.add_argument("--detector", help="RetinaFace or SCRFD ONNX (default: RetinaFace-MobileNet0.25)")
    g.add_argument("--aligner", help="aligner model for --landmarks aligner (default: runtime/models/aligner.onnx)")
    g.add_argument("--landmarks", choices=("detector", "aligner"), default="detector",
                   help="where the 5 landmarks come from (default: detector)")
    g.add_argument("--backend", default="auto", help="inference backend: auto, onnxruntime, openvino, tensorrt (default: auto)")
    g.add_argument("--threshold", type=float, help="cosine threshold for 'same' (default: the recognizer's)")
    g.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   help=f"detector score threshold (default: {DEFAULT_SCORE_THRESHOLD})")
    return models


def build_parser(prog: str = "python -m runtime") -> argparse.ArgumentParser:
    """The command-line parser; its ``commands`` attribute names the sub-commands."""
    models = _model_options()
    p = argparse.ArgumentParser(prog=prog, description="facekit: detect, compare and identify faces")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("detect", parents=[models], help="detect faces and their 5 landmarks")
    d.add_argument("image")
    d.add_argument("--out", help="write an annotated copy of the image here")
    d.add_argument("--json", action="store_true", help="print a JSON list of faces")
    d.set_defaults(func=cmd_detect)

    c = sub.add_parser("compare", parents=[models], help="compare the subject face (big and central) of two images")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", action="store_true", help='print {"similarity": ..., "same": ...}')
    c.set_defaults(func=cmd_compare)

    m = sub.add_parser("matrix", parents=[models], help="similarity matrix of every photo in a folder, as a PNG")
    m.add_argument("folder")
    m.add_argument("--out", required=True, help="heat-map PNG to write")
    m.add_argument("--json", action="store_true", help="also print the matrix as JSON")
    m.set_defaults(func=cmd_matrix)

    e = sub.add_parser("enroll", parents=[models], help="add a person's photos to a gallery file")
    e.add_argument("gallery")
    e.add_argument("name")
    e.add_argument("images", nargs="+")
    e.set_defaults(func=cmd_enroll)

    i = sub.add_parser("identify", parents=[models], help="who is in this photo, according to a gallery")
    i.add_argument("gallery")
    i.add_argument("image")
    i.add_argument("--top-k", type=int, default=1)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_identify)

    add_index_command(sub, [models])

    s = sub.add_parser("serve", parents=[models], help="the HTTP service (needs the serve extra)")
    add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)
    p.commands = sorted(sub.choices)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m runtime") -> int:
    args = build_parser(prog).parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        print("error: --top-k must be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with decoder_messages_silenced():  # no libjpeg/libpng chatter: errors are one line
            return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # disk full, unwritable output, ...
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a model/library failure: still one line unless debugging
        if os.environ.get("FACEKIT_DEBUG"):
            raise
        msg = one_line(str(e), 500) or "no message"
        print(f"error: {type(e).__name__}: {msg} (set FACEKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

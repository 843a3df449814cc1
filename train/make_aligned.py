"""Raw photos → aligned, identity-labelled 112×112 face crops (the recognizer's training set).

For every photo: load → detect (``runtime.detector``) → pick one face → 5 landmarks (the detector's own, or
refined by the hourglass aligner) → ``runtime.geometry.warp_face`` onto the ArcFace template (or, with
``--like MODEL``, onto that recognizer's own framing and size, e.g. calibration crops for an imported dlib
network: ``--like runtime/models/recognizer.onnx``).

    # CelebA in-the-wild: a list file ``file identity`` plus the folder holding the files
    python train/make_aligned.py --list $FACEKIT_DATA/celeba/identity_wild.txt \
        --root $FACEKIT_DATA/celeba/wild --out work_data/celeba_wild_112 --workers 2

    # a folder tree ``SRC/<identity>/<photo>``
    python train/make_aligned.py --src photos_by_person/ --out aligned/ --landmarks aligner

Output (``--out``):
  ``<identity>/<name>.png`` crops (``--layout tree``, default) or ``images/<name>.png`` (``--layout flat``);
  ``list.txt``      ``relative/path.png<TAB>identity`` for every crop (the list-file format train/ reads;
                    the tab keeps spaces in paths and names apart);
  ``manifest.csv``  one row per source photo: status ``ok`` or ``failed``, the reason, faces found, and for
                    the chosen face its score, box (x1 y1 x2 y2) and the 5 landmarks used (x y × 5);
  ``summary.json``  counts by status and reason;
  ``debug/``        with ``--debug``: the photo with every face drawn (chosen one green) beside the crop.

Which face: the subject by the runtime's one rule (:mod:`runtime.subject`: the highest
``area − 2·|box centre − image centre|²``), the same face ``FacePipeline`` and the benchmarks use. Faces below
``--min-face`` pixels (shorter box side) are ignored (``face too small`` if only such faces exist); when
another face is at least 1/``--dominance`` (default 2) as prominent as the subject (box area × score²), the
photo is reported as ``several faces`` and skipped (a wrong identity label is worse than a missing crop).

Failure reasons: ``unreadable`` (with the loader's message), ``no face``, ``face too small``,
``several faces``, ``landmarks failed``, ``conflicting labels`` (a list file naming one photo under two
identities), ``error`` (an unexpected exception, with its message). Nothing is dropped silently: every source is a row of the manifest.

Resumable: rows already in ``manifest.csv`` are skipped (``ok`` rows only while their crop file exists),
so an interrupted run continues where it stopped; ``--retry-failed`` processes the failed rows again,
``--redo`` starts over. Every file is written atomically.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime import shipped
from runtime.backends.base import ModelLoadError
from runtime.cpu import usable_cores
from runtime.detector import DEFAULT_SCORE_THRESHOLD
from runtime.field_options import FieldOptions, option
from runtime.files import atomic_write_bytes
from runtime.geometry import template_for_size
from runtime.image_io import load_image
from runtime.messages import one_line
from runtime.metadata import ModelMetadataError
from runtime.photo_lists import PhotoListError, photos_in_tree, read_photo_list
from runtime.pipeline import FacePipeline
from runtime.preprocess import PreprocessSpec
from runtime.subject import choose_subject
from train.datasets import UNLABELLED
from train.model_files import is_checkpoint

MANIFEST_FIELDS = ("source", "identity", "status", "reason", "output", "faces", "score", "box", "landmarks")


@dataclass(frozen=True)
class Source:
    """One input photo: path relative to the root (the manifest key), absolute path and identity label."""

    rel: str
    path: str
    identity: str


@dataclass
class Options:
    size: int = option(112, "crop side in pixels")
    #: 5 (x, y) points to warp onto; None: the ArcFace template scaled to ``size``
    template: tuple[tuple[float, float], ...] | None = None
    landmarks: str = option("detector", "the detector's 5 points, or refined by the hourglass aligner",
                            choices=("detector", "aligner"))
    aligner: str | None = option(None, "aligner ONNX", shown="runtime/models/aligner.onnx")
    score_threshold: float = option(DEFAULT_SCORE_THRESHOLD, "detector score threshold")
    min_face: float = option(16.0, "ignore faces whose box is smaller (px)")
    dominance: float = option(2.0, "several faces: take the heaviest only if it outweighs the next by this factor")
    layout: str = option("tree", "crops in OUT/<identity>/ (tree) or all in OUT/images/ (flat)",
                         choices=("tree", "flat"))
    image_format: str = option("png", "crop file format", flag="--format", choices=("png", "jpg"))
    debug: bool = option(False, "write overlay pictures under OUT/debug/")
    out: str = ""


#: the command-line options that set an :class:`Options` field
OPTIONS = FieldOptions(Options)


# ------------------------------------------------------------------------------------------------ sources


def sources_from_tree(src: Path) -> list[Source]:
    """Images under ``src``: ``src/<identity>/.../<photo>``; photos directly in ``src`` are unlabelled."""
    return [Source(p.path, str(src / p.path), p.name or UNLABELLED) for p in photos_in_tree(src)]


def sources_from_list(list_file: Path, root: Path | None = None) -> tuple[list[Source], list[Source]]:
    """Entries of a ``file identity`` list (identity optional, ``#`` comments); files relative to ``root``
    (default: the list's folder). Exact duplicate lines are merged. Returns (sources, conflicting) where
    ``conflicting`` are files listed under more than one identity (reported, not processed)."""
    root = Path(root) if root is not None else list_file.parent
    photos, conflicts = read_photo_list(list_file)
    good = [Source(p.path, str(root / p.path), p.name or UNLABELLED) for p in photos]
    bad = [Source(c.path, str(root / c.path), ",".join(n or UNLABELLED for n in c.names)) for c in conflicts]
    return good, bad


def output_name(src: Source, opts: Options) -> str:
    """Relative output path of a source's crop (unique per source path)."""
    stem = os.path.splitext(src.rel)[0]
    if opts.layout == "tree":
        # the identity folder already holds the first path component of a tree source
        parts = stem.split("/")
        if len(parts) > 1 and parts[0] == src.identity:
            parts = parts[1:]
        return f"{_safe(src.identity)}/{'__'.join(parts)}.{opts.image_format}"
    return f"images/{stem.replace('/', '__')}.{opts.image_format}"


def _safe(name: str) -> str:
    bad = '<>:"/\\|?*'
    cleaned = "".join("_" if c in bad or ord(c) < 32 else c for c in name).strip(". ")
    return cleaned or "_"


# ------------------------------------------------------------------------------------------- face choice


def choose_face(detections: list, image_shape: tuple[int, ...], min_face: float = 16.0,
                dominance: float = 2.0) -> tuple[int | None, str]:
    """Index of the photo's subject among ``detections`` (objects with a ``box``) and '' — or (None, failure
    reason): :func:`runtime.subject.choose_subject` with this tool's defaults."""
    return choose_subject([d.box for d in detections], image_shape, min_face, dominance,
                          [d.score for d in detections])


# ---------------------------------------------------------------------------------------------- the work

_WORKER: dict = {}


def crop_spec(opts: Options) -> PreprocessSpec:
    """The crop ``opts`` asks for: ``size``² onto ``template`` (default: the ArcFace template scaled)."""
    if opts.template is None:
        return PreprocessSpec(input_size=(opts.size, opts.size))
    return PreprocessSpec(input_size=(opts.size, opts.size), template=tuple(map(tuple, opts.template)))


def init_worker(opts: Options, threads: int = 1) -> None:
    """Per-process setup: single-threaded OpenCV and models, one face finder (detector, aligner, crop)."""
    cv2.setNumThreads(0)
    _WORKER["finder"] = FacePipeline(landmarks=opts.landmarks, aligner=opts.aligner, backend="onnxruntime",
                                     score_threshold=opts.score_threshold, preprocess=crop_spec(opts),
                                     model_options={"device": "cpu", "threads": threads})
    _WORKER["opts"] = opts


def process(src: Source) -> dict:
    """Align one photo; returns its manifest row. An unexpected error becomes a failed row, never a crash."""
    try:
        return _process(src)
    except Exception as e:  # noqa: BLE001 - one bad photo must not stop thousands of others
        return {"source": src.rel, "identity": src.identity, "status": "failed",
                "reason": f"error: {type(e).__name__}: {one_line(str(e), 200)}", "output": "", "faces": "", "score": "", "box": "",
                "landmarks": ""}


def _process(src: Source) -> dict:
    opts: Options = _WORKER["opts"]
    row = {"source": src.rel, "identity": src.identity, "status": "failed", "reason": "", "output": "",
           "faces": "", "score": "", "box": "", "landmarks": ""}
    finder: FacePipeline = _WORKER["finder"]
    try:
        image = load_image(src.path)
    except (ValueError, OSError) as e:
        row["reason"] = f"unreadable: {str(e).replace(src.path, '').strip(': ') or type(e).__name__}"
        return row
    crop, points, index = None, None, None
    try:
        found = finder.find_subject(image, min_face=opts.min_face, dominance=opts.dominance)
    except ValueError as e:  # the aligner refused the face's landmarks
        found, reason = None, f"landmarks failed: {e}"
    if found is not None:
        detections, reason = found.faces, found.reason
        row["faces"] = str(len(detections))
        if found.face is not None:
            index = next(i for i, f in enumerate(detections) if f is found.face)
            row["score"] = f"{found.face.score:.4f}"
            row["box"] = " ".join(f"{v:.1f}" for v in found.face.box)
            points = found.face.landmarks
    if points is not None:
        try:
            crop = finder.spec.warp(image, points)
        except ValueError as e:
            reason = f"landmarks failed: {e}"
        else:
            rel_out = output_name(src, opts)
            write_image(Path(opts.out) / rel_out, crop, opts.image_format)
            row.update(status="ok", output=rel_out,
                       landmarks=" ".join(f"{v:.2f}" for v in np.asarray(points).reshape(-1)))
    row["reason"] = reason
    if opts.debug:
        pts = points if index is not None and crop is not None else None
        picture = debug_picture(image, [] if found is None else found.faces, index, pts, crop, opts.size,
                                opts.template)
        name = os.path.splitext(src.rel)[0].replace("/", "__") + ".jpg"
        write_image(Path(opts.out) / "debug" / row["status"] / name, picture, "jpg")
        stale = Path(opts.out) / "debug" / ("failed" if row["status"] == "ok" else "ok") / name
        if stale.is_file():  # from an earlier run with another outcome
            stale.unlink()
    return row


def debug_picture(image: np.ndarray, detections: list, chosen: int | None, landmarks: np.ndarray | None,
                  crop: np.ndarray | None, size: int, template=None) -> np.ndarray:
    """The photo with every face box (chosen: green, others: red) and landmarks, beside the crop with the template."""
    canvas = image.copy()
    thick = max(1, round(max(image.shape[:2]) / 300))
    for i, d in enumerate(detections):
        colour = (0, 200, 0) if i == chosen else (0, 0, 230)
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thick)
        for x, y in d.landmarks:
            cv2.circle(canvas, (int(round(x)), int(round(y))), thick + 1, colour, -1)
    if landmarks is not None:
        for x, y in landmarks:
            cv2.circle(canvas, (int(round(x)), int(round(y))), thick + 1, (255, 200, 0), -1)
    h = canvas.shape[0]
    side = crop.copy() if crop is not None else np.zeros((size, size, 3), np.uint8)
    for x, y in (template_for_size((size, size)) if template is None else template):
        cv2.drawMarker(side, (int(round(x)), int(round(y))), (0, 255, 255), cv2.MARKER_CROSS, 6, 1)
    if h > size:
        side = cv2.resize(side, (h, h), interpolation=cv2.INTER_NEAREST)
    pad = np.zeros((h, side.shape[1], 3), np.uint8)
    pad[: side.shape[0]] = side[:h]
    return np.hstack([canvas, pad])


def model_spec(model: str):
    """The preprocessing of a recognizer: a checkpoint's config or an ONNX file's facekit metadata."""
    from runtime.preprocess import spec_from_config

    if is_checkpoint(model):
        from train.checkpoint import load_checkpoint

        return spec_from_config(load_checkpoint(model).get("config") or {})
    from runtime.backends import load_model
    from runtime.metadata import recognizer_preprocessing

    return recognizer_preprocessing(load_model(model, backend="onnxruntime"))[1]


def write_image(path: Path, image: np.ndarray, image_format: str) -> None:
    """Encode and write atomically (temp file in the same folder, fsync, os.replace)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format in ("jpg", "jpeg") else []
    ok, buf = cv2.imencode(f".{image_format}", image, params)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write_bytes(path, buf.tobytes())


# ---------------------------------------------------------------------------------------------- manifest


def read_manifest(path: Path) -> dict[str, dict]:
    """Rows of an existing manifest keyed by source (a torn last line from a killed run is ignored)."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("source") and row.get("status") in ("ok", "failed") and None not in row.values():
                rows[row["source"]] = row
    return rows


def write_manifest(out: Path, rows: dict[str, dict]) -> None:
    """Rewrite manifest.csv atomically from ``rows`` (sorted by source)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: rows[key].get(k, "") for k in MANIFEST_FIELDS} for key in sorted(rows))
    atomic_write_bytes(out / "manifest.csv", buf.getvalue().encode())


def write_outputs(out: Path, rows: dict[str, dict]) -> dict:
    """Rewrite manifest.csv, list.txt and summary.json atomically from all rows; returns the summary."""
    ordered = [rows[k] for k in sorted(rows)]
    write_manifest(out, rows)
    lines = [f"{r['output']}\t{r['identity']}" for r in ordered if r["status"] == "ok"]
    atomic_write_bytes(out / "list.txt", ("\n".join(lines) + ("\n" if lines else "")).encode())
    reasons = Counter(r["reason"].split(":")[0] for r in ordered if r["status"] == "failed")
    summary = {
        "sources": len(ordered),
        "ok": sum(r["status"] == "ok" for r in ordered),
        "failed": sum(r["status"] == "failed" for r in ordered),
        "failure_reasons": dict(sorted(reasons.items())),
        "identities": len({r["identity"] for r in ordered if r["status"] == "ok"}),
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def make_aligned(sources: list[Source], out: Path, opts: Options, workers: int = 1, redo: bool = False,
                 conflicting: list[Source] = (), progress: bool = True, retry_failed: bool = False) -> dict:
    """Align every source into ``out``; returns the summary (also written to ``out/summary.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    opts.out = str(out)
    manifest = out / "manifest.csv"
    rows = {} if redo else read_manifest(manifest)
    for key in [k for k, r in rows.items() if r["status"] == "ok" and not (out / r["output"]).is_file()]:
        del rows[key]
    if retry_failed:
        rows = {k: r for k, r in rows.items() if r["status"] == "ok"}
    for src in conflicting:
        rows[src.rel] = {"source": src.rel, "identity": src.identity, "status": "failed",
                         "reason": f"conflicting labels: {src.identity}", "output": "", "faces": "",
                         "score": "", "box": "", "landmarks": ""}
    todo = [s for s in sources if s.rel not in rows]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="aligning", unit="photo", disable=not progress)
    # append rows as they come so a killed run loses nothing; list.txt and summary.json keep their previous
    # complete state until everything is rewritten atomically at the end
    write_manifest(out, rows)
    with open(manifest, "a", newline="", encoding="utf-8") as mf:
        writer = csv.DictWriter(mf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")

        def record(row: dict) -> None:
            rows[row["source"]] = row
            writer.writerow(row)
            mf.flush()
            bar.update(1)
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows.values()))

        if workers <= 1 or len(todo) < 2:
            init_worker(opts)
            for src in todo:
                record(process(src))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=init_worker, initargs=(opts,)) as pool:
                for row in pool.imap_unordered(process, todo, chunksize=4):
                    record(row)
    bar.close()
    return write_outputs(out, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--src", type=Path, help="folder tree SRC/<identity>/<photo>")
    g.add_argument("--list", type=Path, help="list file of 'file identity' lines")
    p.add_argument("--root", type=Path, help="folder the list's files are relative to (default: the list's folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    OPTIONS.add(p, "landmarks", "aligner", "size")
    p.add_argument("--like", metavar="MODEL", help="crop in this recognizer's framing instead (its size and template, "
                                                   "from a checkpoint's config or an ONNX file's metadata)")
    OPTIONS.add(p)
    workers = min(4, usable_cores())
    p.add_argument("--workers", type=int, default=workers,
                   help=f"worker processes (default {workers}: the usable cores, at most 4)")
    p.add_argument("--redo", action="store_true", help="ignore an existing manifest and start over")
    p.add_argument("--retry-failed", action="store_true", help="process the manifest's failed photos again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    if a.list is not None:
        if not a.list.is_file():
            p.error(f"list file {a.list} not found")
        try:
            sources, conflicting = sources_from_list(a.list, a.root)
        except PhotoListError as e:
            p.error(str(e))
    else:
        if not a.src.is_dir():
            p.error(f"{a.src} is not a folder")
        sources, conflicting = sources_from_tree(a.src), []
    if not sources and not conflicting:
        p.error("no images found")
    aligner = a.aligner
    if a.landmarks == "aligner":
        aligner = aligner or str(shipped.ALIGNER)
        if not os.path.isfile(aligner):
            p.error(f"aligner model {aligner} not found (export one, or use --landmarks detector)")
    size, template = a.size, None
    if a.like:
        try:
            spec = model_spec(a.like)
        except (ModelLoadError, ModelMetadataError, FileNotFoundError) as e:
            p.error(f"--like: {e}")
        size, template = spec.input_size[0], tuple(map(tuple, spec.crop_template.tolist()))
        if spec.input_size[0] != spec.input_size[1]:
            p.error(f"{a.like}: crops are square here, the model takes {spec.input_size}")
    opts = OPTIONS.build(a, size=size, template=template, aligner=aligner)
    summary = make_aligned(sources, a.out, opts, workers=a.workers, redo=a.redo, conflicting=conflicting,
                           progress=not a.no_progress, retry_failed=a.retry_failed)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

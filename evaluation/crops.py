"""Aligned crops of a pair set's images, in the recognizer's framing, cached.

Raw photos go through the runtime's one subject path (``FacePipeline.find_subject``: detector → the
subject face by :mod:`runtime.subject`'s rule → the detector's 5 points or the aligner's refinement), then
``PreprocessSpec.warp`` onto the recognizer's template. No face at the normal threshold: retry at a low
threshold; still none: the data set's median landmark placement (a fixed template placement relative to the
image), so every pair is still scored. Each crop records which of these happened. Pre-aligned crops
(``.bin``) are decoded and re-warped onto the recognizer's template when it is not the ArcFace one.

:func:`aligned_crops` caches the crops per data set as a uint8 npz under ``$FACEKIT_CACHE`` (default
``~/.cache/facekit``), keyed by the data set, the image list, the models and the alignment code.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime import shipped
from runtime.cpu import usable_cores
from runtime.detector import DEFAULT_DETECTOR
from runtime.files import atomic_write, cache_dir, sha256_file
from runtime.geometry import ARCFACE_TEMPLATE_112, template_for_size
from runtime.image_io import load_image
from runtime.messages import first_line
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec

from .pairs import PairSet

#: Bump when the crop selection / fallback logic changes (invalidates cached crops).
ALIGN_VERSION = 1
CROP_SIZE = (112, 112)
#: How each crop was obtained (stored per image in the cache and counted in reports).
HOW_DETECTED, HOW_LOW_THRESHOLD, HOW_FALLBACK, HOW_PREALIGNED, HOW_UNREADABLE = 0, 1, 2, 3, 4
HOW_NAMES = {HOW_DETECTED: "detected", HOW_LOW_THRESHOLD: "low_threshold", HOW_FALLBACK: "centre_fallback",
             HOW_PREALIGNED: "prealigned", HOW_UNREADABLE: "unreadable_black"}
DETECT_THRESHOLD = 0.5
LOW_THRESHOLD = 0.05


def _source_hash(module_names: tuple[str, ...]) -> str:
    """Hash of runtime source files that decide where landmarks land (geometry, detector, subject, landmarks)."""
    import importlib.util

    h = hashlib.sha256()
    for name in module_names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()


class FaceAligner:
    """Raw photo → the 5 landmarks of the photo's subject, the way ``FacePipeline`` finds them (the crop is
    then warped onto the recognizer's template by :func:`aligned_crops`).

    ``workers`` photos are processed concurrently, each model call on one thread (small images parallelise
    better across images than inside one ONNX Runtime call). ``fingerprint`` keys the crop cache.
    """

    def __init__(self, detector_model: str | None = None, landmarks: str = "detector",
                 aligner_model: str | None = None, backend: str = "auto", workers: int | None = None):
        from runtime.pipeline import FacePipeline

        if landmarks not in ("detector", "aligner"):
            raise ValueError(f"landmarks must be 'detector' or 'aligner', got {landmarks!r}")
        self.workers = max(1, workers or min(4, usable_cores()))
        aligner_path = None
        if landmarks == "aligner":
            aligner_path = str(aligner_model or shipped.ALIGNER)
            if not os.path.isfile(aligner_path):
                raise FileNotFoundError(f"{aligner_path}: aligner model not found (use --landmarks detector)")
        self.pipeline = FacePipeline(detector=detector_model, landmarks=landmarks, aligner=aligner_path,
                                     backend=backend, preprocess=RECOGNIZER_SPEC,
                                     model_options={"threads": 1} if self.workers > 1 else None)
        self.landmarks = landmarks
        code = ("runtime.geometry", "runtime.detector", "runtime.subject") + (
            ("runtime.landmarks",) if landmarks == "aligner" else ())
        parts = {"align_version": ALIGN_VERSION, "landmarks": landmarks, "code": _source_hash(code)}
        parts["detector"] = sha256_file(detector_model or DEFAULT_DETECTOR)
        if aligner_path is not None:
            parts["aligner"] = sha256_file(aligner_path)
        self.fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        self.description = {"landmarks": landmarks, "detector": detector_model or "retinaface-mobilenet0.25 (default)",
                            "aligner": aligner_model if landmarks == "aligner" else None}

    def locate(self, image: np.ndarray) -> tuple[np.ndarray | None, int]:
        """(5×2 landmarks, how) for the subject of ``image``; landmarks None when no face was found."""
        found = self.pipeline.find_subject(image, retry_threshold=LOW_THRESHOLD)
        if found.face is None:
            return None, HOW_FALLBACK
        return found.face.landmarks, HOW_DETECTED if found.threshold == DETECT_THRESHOLD else HOW_LOW_THRESHOLD


def default_fallback_landmarks(shape) -> np.ndarray:
    """The template placed on the central 80 % square of the image (used when a dataset has no detection at all)."""
    h, w = shape[:2]
    side = 0.8 * min(h, w)
    return ARCFACE_TEMPLATE_112 / 112.0 * side + np.array([(w - side) / 2, (h - side) / 2], np.float32)


@dataclass
class CropSet:
    """Aligned crops (N×H×W×3 uint8, BGR, in the recognizer's framing) of a pair set's images and how each was
    obtained."""

    crops: np.ndarray
    how: np.ndarray
    cache_file: str | None = None
    from_cache: bool = False
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {HOW_NAMES[k]: int(np.sum(self.how == k)) for k in HOW_NAMES if np.any(self.how == k)}

    @property
    def fallbacks(self) -> int:
        """Images whose crop did not come from a normal-threshold detection (low threshold, centre placement,
        or an unreadable file scored as a black crop)."""
        return int(np.sum(np.isin(self.how, (HOW_LOW_THRESHOLD, HOW_FALLBACK, HOW_UNREADABLE))))


#: Cached crop files kept per data set name (older ones, e.g. from earlier detector code, are deleted).
CACHE_KEEP = 3


def _prune_cache(folder: Path, name: str) -> None:
    files = sorted(folder.glob(f"crops-{name}-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[CACHE_KEEP:]:
        try:
            old.unlink()
        except OSError:
            pass


def prealigned_crops(pairset: PairSet, spec: PreprocessSpec = RECOGNIZER_SPEC, progress: bool = True,
                     warn_resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode pre-aligned crops (ArcFace template, any size) and re-warp them onto ``spec``'s crop; with
    ``warn_resize``, warn once when crops had to be resized (they were perhaps not aligned at all)."""
    from tqdm import tqdm

    size = tuple(spec.input_size)
    arcface_framing = np.allclose(template_for_size(size), spec.crop_template, atol=1e-3)
    out = np.zeros((len(pairset.images), size[0], size[1], 3), np.uint8)
    how = np.full(len(out), HOW_PREALIGNED, np.int8)
    resized = 0
    for i, src in enumerate(tqdm(pairset.images, desc=f"{pairset.name}: decode", unit="img", leave=False,
                                 disable=not progress)):
        img = _read_or_none(src)
        if img is None:
            how[i] = HOW_UNREADABLE  # scored as a black crop, counted in the report
            continue
        if not arcface_framing:  # the crop's own template points are its landmarks
            out[i] = spec.warp(img, template_for_size(img.shape[:2]))
        elif img.shape[:2] != size:
            if warn_resize and not resized:
                warnings.warn(f"{pairset.source}: images are {img.shape[1]}×{img.shape[0]}, not aligned "
                              f"{size[1]}×{size[0]} crops: resized (accuracy is indicative only; align them "
                              "with train/make_aligned.py)", stacklevel=2)
            resized += 1
            out[i] = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        else:
            out[i] = img
    return out, how


def _read_or_none(src) -> np.ndarray | None:
    """The image, or None when the file cannot be decoded (the error is printed once per image)."""
    try:
        return load_image(src)
    except (ValueError, OSError) as e:  # runtime.image_io.ImageError is a ValueError
        print(f"warning: {first_line(e)}; scored as a black crop", file=sys.stderr)
        return None


def _cache_path(pairset: PairSet, aligner: FaceAligner, spec: PreprocessSpec, cache: Path | None) -> Path:
    """The crop cache file of ``pairset`` for these models, code and framing."""
    parts = {"source": pairset.source, "images": pairset.image_keys(), "aligner": aligner.fingerprint}
    size = tuple(spec.input_size)
    if size != CROP_SIZE or not np.allclose(spec.crop_template, RECOGNIZER_SPEC.crop_template):
        parts["crop"] = [list(size), spec.crop_template.round(3).tolist()]  # the default keeps older keys
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return (cache or cache_dir()) / f"crops-{pairset.name}-{key}.npz"


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(crops, how)`` from a cache file of ``n`` crops, or None (absent, damaged or of another length)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            crops, how = z["crops"], z["how"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged cache file is recomputed
    return (crops, how) if len(crops) == n else None


def _detect_and_warp(pairset: PairSet, aligner: FaceAligner, spec: PreprocessSpec,
                     progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(crops, how)`` of raw photos: the subject's landmarks warped onto ``spec``; photos without a face
    get the median placement of the others (or :func:`default_fallback_landmarks`)."""
    from tqdm import tqdm

    n, (h, w) = len(pairset.images), tuple(spec.input_size)
    crops, how = np.zeros((n, h, w, 3), np.uint8), np.zeros(n, np.int8)
    found: list[np.ndarray] = []  # landmarks relative to image size, for the fallback placement
    missing: list[tuple[int, tuple]] = []

    def locate(src):
        img = _read_or_none(src)
        if img is None:
            return None, None, HOW_UNREADABLE, None
        pts, kind = aligner.locate(img)
        return img.shape, pts, kind, (None if pts is None else spec.warp(img, pts))

    with ThreadPoolExecutor(max_workers=aligner.workers) as pool:
        results = pool.map(locate, pairset.images, chunksize=1)
        for i, (shape, pts, kind, crop) in enumerate(tqdm(results, total=n, desc=f"{pairset.name}: detect+align",
                                                          unit="img", disable=not progress)):
            how[i] = kind
            if kind == HOW_UNREADABLE:
                continue
            if pts is None:
                missing.append((i, shape))
                continue
            found.append(pts / np.array([shape[1], shape[0]], np.float32))
            crops[i] = crop
    for i, shape in missing:
        img = load_image(pairset.images[i])
        if found:
            pts = np.median(np.stack(found), axis=0) * np.array([shape[1], shape[0]], np.float32)
        else:
            pts = default_fallback_landmarks(shape)
        crops[i] = spec.warp(img, pts)
    return crops, how


def aligned_crops(pairset: PairSet, aligner: FaceAligner | None = None, use_cache: bool = True,
                  cache: Path | None = None, progress: bool = True,
                  spec: PreprocessSpec = RECOGNIZER_SPEC) -> CropSet:
    """Aligned BGR crops (``spec``'s size and template; 112×112 ArcFace by default) of every image of
    ``pairset`` (cached for raw photos)."""
    t0 = time.perf_counter()
    if pairset.aligned:
        crops, how = prealigned_crops(pairset, spec, progress=progress)
        return CropSet(crops, how, seconds=time.perf_counter() - t0)
    aligner = aligner or FaceAligner()
    path = _cache_path(pairset, aligner, spec, cache)
    cached = _read_cache(path, len(pairset.images)) if use_cache else None
    if cached is not None:
        return CropSet(*cached, str(path), True, time.perf_counter() - t0)
    crops, how = _detect_and_warp(pairset, aligner, spec, progress)
    if use_cache:
        atomic_write(path, lambda f: np.savez(f, crops=crops, how=how, keys=np.array(pairset.image_keys())))
        _prune_cache(path.parent, pairset.name)
    return CropSet(crops, how, str(path) if use_cache else None, False, time.perf_counter() - t0)

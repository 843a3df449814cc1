"""Parity of an exported model with its PyTorch source: inputs, comparison, tolerances.

Inputs are real aligned faces when they can be had (a folder of aligned crops, or ``$FACEKIT_DATA/lfw``
images detected and warped with the runtime's own detector and geometry), else generated images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from evaluation.data import data_root
from runtime.preprocess import PreprocessSpec, to_model_input



@dataclass(frozen=True)
class Tolerance:
    """Pass criteria: minimum per-row cosine, and max |Δ| as a fraction of max |reference| (None: not checked)."""

    min_cos: float
    max_rel: float | None = None


#: Default tolerances against the PyTorch fp32 model, by exported precision.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cos=0.99999, max_rel=1e-3),
    "fp16": Tolerance(min_cos=0.999, max_rel=5e-2),
    "int8": Tolerance(min_cos=0.98, max_rel=None),
    "fp16-weights": Tolerance(min_cos=0.9999, max_rel=5e-3),  # fp32 compute, weights rounded to fp16
}


@dataclass(frozen=True)
class ParityResult:
    """Comparison of one batch: worst absolute difference and cosine over every output row."""

    batch: int
    max_abs: float
    min_cos: float
    mean_cos: float
    ref_max_abs: float


# ------------------------------------------------------------------------------------------------ inputs


def synthetic_crops(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Generated N×H×W×3 uint8 images: smooth random colour fields plus texture, face-sized and varied."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4 + i % 5, 4 + i % 3, 3)).astype(np.float32)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0, 12, size=img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def lfw_images(data_dir: Path, n: int) -> list[Path]:
    """``n`` LFW image paths spread evenly over the (sorted) set; empty when LFW is absent."""
    root = data_dir / "lfw" / "images"
    if not root.is_dir():
        return []
    files = sorted(root.glob("*/*.jpg"))
    if not files:
        return []
    idx = np.linspace(0, len(files) - 1, min(len(files), n)).round().astype(int)
    return [files[i] for i in idx]


def _crops_from_photos(paths: Sequence[Path], n: int, size: tuple[int, int], crop) -> np.ndarray:
    """Up to ``n`` BGR crops: ``crop(image, face)`` of each photo's subject face (the runtime's rule,
    :mod:`runtime.subject`) found by the default detector."""
    from runtime.image_io import load_image
    from runtime.pipeline import FacePipeline

    finder = FacePipeline(preprocess=PreprocessSpec(input_size=size))
    crops = []
    for p in paths:
        found = finder.find_subject(load_image(str(p)))  # an array: coordinates in its own pixels
        if found.face is not None:
            crops.append(crop(found.image, found.face))
        if len(crops) >= n:
            break
    return np.stack(crops) if crops else np.empty((0, size[0], size[1], 3), np.uint8)


def aligned_faces_from_photos(paths: Sequence[Path], spec: PreprocessSpec, n: int) -> np.ndarray:
    """Detect (runtime's default detector) and warp onto ``spec``'s template up to ``n`` faces; BGR crops."""
    return _crops_from_photos(paths, n, tuple(spec.input_size), lambda img, det: spec.warp(img, det.landmarks))


def aligner_crops_from_photos(paths: Sequence[Path], geometry: dict, n: int) -> np.ndarray:
    """The aligner's own crops (:func:`runtime.landmarks.face_crop` around detector boxes); BGR."""
    from runtime.landmarks import AlignerGeometry, face_crop

    geo = AlignerGeometry.from_dict(geometry)

    def crop(img: np.ndarray, det) -> np.ndarray:
        rgb, _ = face_crop(img, det.box, geo, det.landmarks)
        return np.ascontiguousarray(rgb[..., ::-1])

    return _crops_from_photos(paths, n, tuple(geo.input_size), crop)


def parity_crops(spec: PreprocessSpec, n: int, task: str = "recognition", faces_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, seed: int = 0,
                 geometry: dict | None = None) -> tuple[np.ndarray, str]:
    """``n`` BGR uint8 crops of the model's input size, and a description of where they came from.

    Order of preference: ``faces_dir`` (crops of the input size), LFW photos from ``data_dir`` /
    $FACEKIT_DATA (detected, then warped to the template for recognizers or cropped with the aligner
    ``geometry`` for the aligner), generated images.
    """
    size = tuple(spec.input_size)
    if faces_dir is not None:
        from .calibration import load_crop_folder

        crops = load_crop_folder(faces_dir, size, limit=n)
        return _fill(crops, n), f"{len(crops)} aligned crops from {faces_dir}"
    paths = lfw_images(Path(data_dir) if data_dir else data_root(), n + n // 4)
    if paths:
        try:
            if task == "recognition":
                crops = aligned_faces_from_photos(paths, spec, n)
                how = "LFW photos, detected and warped to the template"
            else:
                crops = aligner_crops_from_photos(paths, {**(geometry or {}), "input_size": list(size)}, n)
                how = "LFW photos, detected and cropped with the aligner geometry"
            if len(crops):
                return _fill(crops, n), f"{len(crops)} {how}"
        except Exception as e:  # the detector is optional here; fall back to generated inputs
            print(f"note: no real faces for parity ({type(e).__name__}: {e}); using generated images")
    return synthetic_crops(n, size, seed), f"{n} generated images (no aligned faces or $FACEKIT_DATA found)"


def _fill(crops: np.ndarray, n: int) -> np.ndarray:
    """Repeat (mirrored on odd rounds) until there are ``n`` crops."""
    if len(crops) >= n:
        return crops[:n]
    reps = [crops if r % 2 == 0 else crops[:, :, ::-1] for r in range(-(-n // len(crops)))]
    return np.ascontiguousarray(np.concatenate(reps)[:n])


# -------------------------------------------------------------------------------------------- comparison


def compare_outputs(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """(max |Δ|, min cosine, mean cosine) between two output batches, row by row (each row flattened)."""
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    out = np.asarray(out, np.float64).reshape(len(out), -1)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, exported {out.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf"), float("-inf"), float("-inf")
    num = (ref * out).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(ref - out).max(1) == 0, 1.0, 0.0))
    return float(np.abs(ref - out).max()), float(cos.min()), float(cos.mean())


def memoize(fn: Callable[[np.ndarray], list[np.ndarray]]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Cache a model function's outputs by input content (compare several exports with one PyTorch run)."""
    import hashlib

    cache: dict[tuple, list[np.ndarray]] = {}

    def run(x: np.ndarray) -> list[np.ndarray]:
        key = (x.shape, str(x.dtype), hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest())
        if key not in cache:
            cache[key] = fn(x)
        return cache[key]

    return run


def batch_of(crops: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` crops (cycled if fewer)."""
    idx = np.arange(batch) % len(crops)
    return crops[idx]


def check_parity(reference: Callable[[np.ndarray], list[np.ndarray]],
                 candidate: Callable[[np.ndarray], list[np.ndarray]], crops: np.ndarray, spec: PreprocessSpec,
                 batches: Sequence[int], color_order: str = "BGR") -> list[ParityResult]:
    """Run both models on the same preprocessed batches; one :class:`ParityResult` per batch size."""
    results = []
    for b in batches:
        x = to_model_input(batch_of(crops, int(b)), spec, color_order=color_order)
        ref, out = reference(x), candidate(x)
        if len(ref) != len(out):
            raise ValueError(f"reference has {len(ref)} outputs, exported model {len(out)}")
        stats = [compare_outputs(r, o) for r, o in zip(ref, out)]
        for r, o in zip(ref, out):
            if np.asarray(o).shape[0] != int(b):
                raise ValueError(f"batch {b}: exported model returned batch {np.asarray(o).shape[0]}")
        results.append(ParityResult(
            batch=int(b), max_abs=max(s[0] for s in stats), min_cos=min(s[1] for s in stats),
            mean_cos=min(s[2] for s in stats), ref_max_abs=max(float(np.abs(r).max()) for r in ref),
        ))
    return results


def failures(results: Sequence[ParityResult], tol: Tolerance) -> list[str]:
    """Human-readable reasons the results miss ``tol`` (empty when they pass)."""
    out = []
    for r in results:
        if not r.min_cos >= tol.min_cos:
            out.append(f"batch {r.batch}: min cosine {r.min_cos:.6f} < {tol.min_cos}")
        if tol.max_rel is not None and not r.max_abs <= tol.max_rel * max(r.ref_max_abs, 1e-12):
            out.append(f"batch {r.batch}: max |Δ| {r.max_abs:.3g} > {tol.max_rel} × max |reference| {r.ref_max_abs:.3g}")
    return out


def summary(results: Sequence[ParityResult]) -> tuple[float, float]:
    """(worst max |Δ|, worst min cosine) over all batches."""
    return max(r.max_abs for r in results), min(r.min_cos for r in results)


def parity_line(results: Sequence[ParityResult]) -> str:
    """The CLI's last line: ``parity: max_abs=<float> min_cos=<float>``."""
    max_abs, min_cos = summary(results)
    return f"parity: max_abs={max_abs:.6g} min_cos={min_cos:.10f}"

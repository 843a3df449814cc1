"""Landmark accuracy: a landmark refiner against the detector's own 5 points, on the same faces.

For every image with a ``.pts5`` file (5 points in LANDMARK_NAMES order) the detector runs once; the
detection holding the annotated face (highest score among boxes that contain the centroid of the
ground-truth points) gives both the detector's 5 points and the box the refiner works inside. NME is the
mean point error over the inter-ocular distance (eye centre to eye centre); failures have NME > 10 %.
Images where the detector finds no such face are counted as ``missed`` and left out of both figures.

    from runtime.landmarks import LandmarkRefiner
    evaluate_landmarks("$FACEKIT_DATA/landmarks_300w/test", LandmarkRefiner("runtime/models/aligner.onnx"))

The refiner is any object with ``refine(image_bgr, box, landmarks) -> (5, 2)``: the runtime's ONNX
:class:`runtime.landmarks.LandmarkRefiner` or a PyTorch one built in ``train/``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from runtime.files import existing_folder
from runtime.geometry import LANDMARK_NAMES
from runtime.image_io import load_image
from runtime.landmark_fallback import FallbackRule, disagreement

#: A prediction whose NME exceeds this counts as a failure.
FAILURE_THRESHOLD = 0.10
#: Table labels of :func:`evaluate_landmarks` result keys (other keys are shown as they are).
ROW_LABELS = {"aligner": "aligner", "aligner_raw": "aligner's own points, no fallback"}


class Refiner(Protocol):
    """What :func:`evaluate_landmarks` calls: 5 image-pixel points for a face box (and initial points)."""

    def refine(self, image_bgr: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        ...


def _point_errors(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's distance to its ground truth (…, 5) and each face's inter-ocular distance (…), float64."""
    p = np.asarray(pred, np.float64)
    g = np.asarray(gt, np.float64)
    if p.shape != g.shape or p.shape[-2:] != (len(LANDMARK_NAMES), 2):
        raise ValueError(f"need matching (N, 5, 2) arrays, got {p.shape} and {g.shape}")
    iod = np.linalg.norm(g[..., 0, :] - g[..., 1, :], axis=-1)
    if np.any(iod <= 0):
        raise ValueError("ground truth with coincident eyes: inter-ocular distance is zero")
    return np.linalg.norm(p - g, axis=-1), iod


def nme(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-face mean point error divided by the inter-ocular distance (eye centre to eye centre).

    ``pred`` and ``gt`` are (N, 5, 2) or (5, 2) in LANDMARK_NAMES order; returns (N,) (or a scalar).
    """
    errors, iod = _point_errors(pred, gt)
    return errors.mean(-1) / iod


def failure_rate(nmes: np.ndarray, threshold: float = FAILURE_THRESHOLD) -> float:
    """Fraction of faces whose NME exceeds ``threshold``."""
    v = np.asarray(nmes, np.float64).reshape(-1)
    return float((v > threshold).mean()) if v.size else float("nan")


def read_points(path: str | os.PathLike) -> np.ndarray:
    """A ``.pts5`` / ``.pts68`` file: one ``x y`` per line → (K, 2) float64."""
    pts = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{path}: expected 'x y' lines, got shape {pts.shape}")
    return pts


def landmark_files(data_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, .pts5) pairs under ``data_dir`` (recursively), sorted by path."""
    root = existing_folder(data_dir, what="a landmark folder")
    pairs = []
    for pts in sorted(root.rglob("*.pts5")):
        for ext in (".jpg", ".jpeg", ".png"):
            if pts.with_suffix(ext).is_file():
                pairs.append((pts.with_suffix(ext), pts))
                break
    if not pairs:
        raise FileNotFoundError(f"no image + .pts5 pairs under {root}")
    return pairs


def match_detection(detections: list, gt: np.ndarray):
    """The detection of the annotated face: highest score among boxes that contain the centroid of the
    ground-truth points; None when no box does."""
    c = np.asarray(gt, np.float64).reshape(-1, 2).mean(0)
    inside = [d for d in detections if d.box[0] <= c[0] <= d.box[2] and d.box[1] <= c[1] <= d.box[3]]
    return max(inside, key=lambda d: d.score) if inside else None


def annotated_faces(pairs: list[tuple[Path, Path]], detector: Any, desc: str,
                    progress: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
    """For each (image, ``.pts5``) pair: the image (BGR), its ground-truth points and the detection of that
    face (:func:`match_detection`; None when the detector missed it), with a progress bar."""
    from tqdm import tqdm

    for img_path, pts_path in tqdm(pairs, desc=desc, disable=not progress):
        image = load_image(img_path)
        gt = read_points(pts_path)[: len(LANDMARK_NAMES)]
        yield image, gt, match_detection(detector.detect(image), gt)


def per_landmark_nme(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(5,) mean error of each landmark over the inter-ocular distance, for (N, 5, 2) arrays."""
    errors, iod = _point_errors(pred, gt)
    return (errors / iod[..., None]).reshape(-1, len(LANDMARK_NAMES)).mean(0)


def summarize(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """NME, failure rate, median NME and per-landmark NME of (N, 5, 2) predictions."""
    values = nme(pred, gt)
    return {
        "nme": float(values.mean()) if values.size else float("nan"),
        "failure_rate": failure_rate(values),
        "median_nme": float(np.median(values)) if values.size else float("nan"),
        "per_landmark": {n: float(v) for n, v in zip(LANDMARK_NAMES, per_landmark_nme(pred, gt))},
    }


def evaluate_landmarks(data_dir: str | os.PathLike, refiner: Refiner | dict[str, Refiner], detector: Any = None,
                       progress: bool = True, model_name: str | None = None) -> dict[str, Any]:
    """NME and failure rate of ``refiner`` and of the detector's 5 points on the same faces.

    ``refiner`` is one refiner (reported as ``"aligner"``) or several by name, all run on the same
    detections. ``detector`` None: the runtime's default detector. ``model_name`` labels the aligner in
    the result (default: the refiner's ``path``). Returns ``{"aligner": {"nme", "failure_rate",
    "median_nme", "per_landmark", "ms_per_face"}, "detector": {...}, "images": N, "missed": M,
    "data": str, "aligner_model": str}`` (one entry per refiner name).
    """
    from runtime.detector import load_detector

    refiners = refiner if isinstance(refiner, dict) else {"aligner": refiner}
    pairs = landmark_files(data_dir)
    det = detector if detector is not None else load_detector()
    gts, det_pts = [], []
    found: dict[str, list] = {name: [] for name in refiners}
    seconds = dict.fromkeys(refiners, 0.0)
    missed = 0
    for image, gt, d in annotated_faces(pairs, det, "landmarks", progress):
        if d is None:
            missed += 1
            continue
        for name, r in refiners.items():
            t = time.perf_counter()
            found[name].append(r.refine(image, d.box, d.landmarks))
            seconds[name] += time.perf_counter() - t
        gts.append(gt)
        det_pts.append(d.landmarks)
    n = len(gts)
    if n == 0:
        raise RuntimeError(f"the detector found none of the {len(pairs)} annotated faces in {data_dir}")
    gts = np.stack(gts)
    first = next(iter(refiners.values()))
    result: dict[str, Any] = {name: {**summarize(np.stack(found[name]), gts), "ms_per_face": 1000 * seconds[name] / n}
                              for name in refiners}
    result.update(detector=summarize(np.stack(det_pts), gts), images=n, missed=missed, data=str(data_dir),
                  aligner_model=model_name or str(getattr(first, "path", type(first).__name__)))
    return result


def fallback_rule(detector_points: np.ndarray, aligner_points: np.ndarray, peaks: np.ndarray,
                  coverage: float = 0.99) -> FallbackRule:
    """The :class:`runtime.landmarks.FallbackRule` that keeps the aligner's points on ``coverage`` of these
    faces by each of its criteria: the (1 − coverage) quantile of the weakest heatmap peak per face and
    the ``coverage`` quantile of the aligner's disagreement with the detector. Measured on the aligner's
    training faces, it marks the range the aligner was trained for."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    dis = disagreement(aligner_points, detector_points)
    dis = dis[np.isfinite(dis)]
    min_peaks = np.asarray(peaks, np.float64).reshape(len(aligner_points), -1).min(1)
    if not dis.size:
        raise ValueError("no face with a measurable disagreement (detector eyes coincide everywhere)")
    return FallbackRule(min_peak=round(float(np.quantile(min_peaks, 1 - coverage)), 4),
                        max_disagreement=round(float(np.quantile(dis, coverage)), 4))


def aligner_agreement(data_dirs: list[str | os.PathLike], refiner: Any, detector: Any = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(detector points (N, 5, 2), the aligner's own points (N, 5, 2), their peaks (N, 5)) of the annotated
    faces the detector finds in ``data_dirs``; ``refiner`` needs ``refine_details`` (the runtime's
    :class:`~runtime.landmarks.LandmarkRefiner` or ``train``'s ``TorchRefiner``)."""
    from runtime.detector import load_detector

    det = detector if detector is not None else load_detector()
    det_pts, ali_pts, peaks = [], [], []
    pairs = [pair for folder in data_dirs for pair in landmark_files(folder)]
    for image, _, d in annotated_faces(pairs, det, "aligner vs detector", progress):
        if d is None:
            continue
        r = refiner.refine_details(image, [d.box], [d.landmarks])
        det_pts.append(d.landmarks)
        ali_pts.append(r.aligner[0])
        peaks.append(r.peaks[0])
    if not det_pts:
        raise RuntimeError(f"the detector found none of the {len(pairs)} annotated faces")
    return np.stack(det_pts), np.stack(ali_pts), np.stack(peaks)


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of an :func:`evaluate_landmarks` result."""
    lines = [
        f"landmarks on {result['data']}: {result['images']} faces ({result['missed']} missed by the detector)",
        "",
        "| points | NME (inter-ocular) | median NME | failure rate (NME > 10 %) | "
        + " | ".join(LANDMARK_NAMES) + " |",
        "|---|---|---|---|" + "---|" * len(LANDMARK_NAMES),
    ]
    names = [k for k, v in result.items() if isinstance(v, dict) and "per_landmark" in v and k != "detector"]
    model = Path(result["aligner_model"]).name
    for key in names + ["detector"]:
        r = result[key]
        label = "detector" if key == "detector" else f"{ROW_LABELS.get(key, key)} ({model})"
        per = " | ".join(f"{100 * r['per_landmark'][n]:.2f} %" for n in LANDMARK_NAMES)
        lines.append(f"| {label} | {100 * r['nme']:.2f} % | {100 * r['median_nme']:.2f} % | "
                     f"{100 * r['failure_rate']:.1f} % | {per} |")
    timing = [f"{k}: {result[k]['ms_per_face']:.1f} ms per face" for k in names if "ms_per_face" in result[k]]
    if timing:
        lines += ["", "; ".join(timing) + " (crop + network + decoding)"]
    return "\n".join(lines)

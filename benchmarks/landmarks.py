"""Landmark accuracy: the hourglass aligner against the detector's own 5 points, on the same faces.

For every image with a ``.pts5`` file (5 points in LANDMARK_NAMES order) the default detector runs once;
the detection holding the annotated face (highest score among boxes that contain the centroid of the
ground-truth points) gives both the detector's 5 points and the box the aligner refines inside. NME is the
mean point error over the inter-ocular distance (eye centre to eye centre); failures have NME > 10 %.
Images where the detector finds no such face are counted as ``missed`` and left out of both figures.

    from benchmarks.landmarks import evaluate_landmarks
    evaluate_landmarks("$FACEKIT_DATA/landmarks_300w/test")            # the shipped aligner
    evaluate_landmarks(DIR, aligner="runs/aligner_default/last.pt")    # a checkpoint (needs torch)
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from runtime.geometry import LANDMARK_NAMES  # noqa: E402
from runtime.landmarks import failure_rate, nme  # noqa: E402

DEFAULT_ALIGNER = Path(__file__).resolve().parents[1] / "runtime" / "models" / "aligner.onnx"


def read_points(path: str | os.PathLike) -> np.ndarray:
    """A ``.pts5`` / ``.pts68`` file: one ``x y`` per line → (K, 2) float64."""
    pts = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{path}: expected 'x y' lines, got shape {pts.shape}")
    return pts


def landmark_files(data_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, .pts5) pairs under ``data_dir`` (recursively), sorted by path."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"landmark folder {root} not found")
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


def load_aligner(aligner: Any = None):
    """An object with ``refine(image_bgr, box, landmarks)``: given, an ONNX/engine file (LandmarkRefiner),
    a PyTorch checkpoint (train.aligner.TorchRefiner, needs torch) or None for the shipped aligner."""
    if aligner is not None and hasattr(aligner, "refine"):
        return aligner
    path = Path(aligner) if aligner is not None else DEFAULT_ALIGNER
    if not path.is_file():
        hint = " (train and export one: see runtime/models/aligner.md)" if aligner is None else ""
        raise FileNotFoundError(f"aligner model {path} not found{hint}")
    if path.suffix.lower() in (".pt", ".pth", ".ckpt"):
        from train.aligner import TorchRefiner

        return TorchRefiner(path)
    from runtime.landmarks import LandmarkRefiner

    return LandmarkRefiner(str(path))


def _summary(values: np.ndarray, per_point: np.ndarray) -> dict[str, Any]:
    return {
        "nme": float(values.mean()) if values.size else float("nan"),
        "failure_rate": failure_rate(values),
        "median_nme": float(np.median(values)) if values.size else float("nan"),
        "per_landmark": {n: float(v) for n, v in zip(LANDMARK_NAMES, per_point)},
    }


def evaluate_landmarks(data_dir: str | os.PathLike, aligner: Any = None, detector: Any = None,
                       progress: bool = True) -> dict[str, Any]:
    """NME and failure rate of the aligner and of the detector's 5 points on the same faces.

    Returns ``{"aligner": {"nme", "failure_rate", "median_nme", "per_landmark", "ms_per_face"},
    "detector": {...}, "images": N, "missed": M, "data": str, "aligner_model": str}``.
    """
    from tqdm import tqdm

    from runtime.detector import load_detector

    pairs = landmark_files(data_dir)
    refiner = load_aligner(aligner)
    det = detector if detector is not None else load_detector()
    gts, det_pts, ali_pts = [], [], []
    missed, refine_s = 0, 0.0
    for img_path, pts_path in tqdm(pairs, desc="landmarks", disable=not progress):
        image = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{img_path}: unreadable image")
        gt = read_points(pts_path)[: len(LANDMARK_NAMES)]
        d = match_detection(det.detect(image), gt)
        if d is None:
            missed += 1
            continue
        t = time.perf_counter()
        refined = refiner.refine(image, d.box, d.landmarks)
        refine_s += time.perf_counter() - t
        gts.append(gt)
        det_pts.append(d.landmarks)
        ali_pts.append(refined)
    n = len(gts)
    if n == 0:
        raise RuntimeError(f"the detector found none of the {len(pairs)} annotated faces in {data_dir}")
    gts, det_pts, ali_pts = np.stack(gts), np.stack(det_pts), np.stack(ali_pts)

    def per_point(pred):
        iod = np.linalg.norm(gts[:, 0] - gts[:, 1], axis=1)[:, None]
        return (np.linalg.norm(pred - gts, axis=2) / iod).mean(0)

    result = {
        "aligner": {**_summary(nme(ali_pts, gts), per_point(ali_pts)), "ms_per_face": 1000 * refine_s / n},
        "detector": _summary(nme(det_pts, gts), per_point(det_pts)),
        "images": n,
        "missed": missed,
        "data": str(data_dir),
        "aligner_model": str(getattr(getattr(refiner, "backend", None), "path", aligner or DEFAULT_ALIGNER)),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of an :func:`evaluate_landmarks` result."""
    lines = [
        f"landmarks on {result['data']}: {result['images']} faces ({result['missed']} missed by the detector)",
        "",
        "| points | NME (inter-ocular) | median NME | failure rate (NME > 10 %) | "
        + " | ".join(LANDMARK_NAMES) + " |",
        "|---|---|---|---|" + "---|" * len(LANDMARK_NAMES),
    ]
    for key, label in (("aligner", f"aligner ({Path(result['aligner_model']).name})"), ("detector", "detector")):
        r = result[key]
        per = " | ".join(f"{100 * r['per_landmark'][n]:.2f} %" for n in LANDMARK_NAMES)
        lines.append(f"| {label} | {100 * r['nme']:.2f} % | {100 * r['median_nme']:.2f} % | "
                     f"{100 * r['failure_rate']:.1f} % | {per} |")
    if "ms_per_face" in result["aligner"]:
        lines += ["", f"aligner: {result['aligner']['ms_per_face']:.1f} ms per face (crop + network + decoding)"]
    return "\n".join(lines)

"""The aligner's data: annotated faces with their detector boxes, training augmentation and heatmap targets.

* :class:`LandmarkData`: the images of landmark folders (images + ``.pts5``) in memory, their ground-truth
  5 points, and the default detector's box and points for each (detected once, cached in an npz);
* :class:`Augmenter`: a random training view (rotation, scale, shift, flip with left/right swapped, colour);
* :func:`make_batch`: model input and Gaussian heatmap targets for a list of views.

Crops, heatmap coding and the input preprocessing come from :mod:`runtime.landmarks`, so training sees
what the runtime feeds the exported model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from evaluation.landmarks import annotated_faces, landmark_files, read_points
from runtime.files import atomic_write
from runtime.geometry import LANDMARK_NAMES, flip_landmarks, transform_points
from runtime.image_io import load_image
from runtime.landmarks import (AlignerGeometry, aligner_spec, crop_face, crop_matrix, crop_to_heatmap,
                               encode_heatmaps, eye_angle, face_crop)
from runtime.preprocess import to_model_input

from .config import ALIGNER_DEFAULTS

NUM_LANDMARKS = len(LANDMARK_NAMES)


def detect_samples(samples: list[tuple[Path, Path]], cache: Path | None = None, progress: bool = True) -> dict:
    """Detector box and 5 points of the annotated face in every sample (NaN where the detector misses).

    Cached in ``cache`` (npz keyed by image path) so training and evaluation detect each image once.
    """
    keys = [str(img) for img, _ in samples]
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if list(z["keys"]) == keys:
                return {"keys": keys, "boxes": z["boxes"], "landmarks": z["landmarks"], "scores": z["scores"]}
    from runtime.detector import load_detector

    det = load_detector(backend="onnxruntime", device="cpu", threads=1)  # one thread: training shares the machine
    boxes = np.full((len(samples), 4), np.nan, np.float32)
    points = np.full((len(samples), 5, 2), np.nan, np.float32)
    scores = np.zeros(len(samples), np.float32)
    for i, (_, _, d) in enumerate(annotated_faces(samples, det, "detecting", progress)):
        if d is not None:
            boxes[i], points[i], scores[i] = d.box, d.landmarks, d.score
    result = {"keys": keys, "boxes": boxes, "landmarks": points, "scores": scores}
    if cache is not None:
        atomic_write(cache, lambda f: np.savez(f, keys=np.array(keys), boxes=boxes, landmarks=points, scores=scores))
    return result


def fallback_boxes(gt: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes for samples the detector missed: the average detector box relative to the 5 ground-truth
    points (centroid and eye-to-mouth distance) of the samples it found. NaN rows are filled."""
    gt = np.asarray(gt, np.float64)
    boxes = np.asarray(boxes, np.float64).copy()
    centre = gt.mean(1)
    scale = np.linalg.norm(gt[:, :2].mean(1) - gt[:, 3:].mean(1), axis=1)[:, None]
    found = np.isfinite(boxes).all(1)
    if not found.any():
        raise ValueError("the detector found none of the faces; cannot relate boxes to landmarks")
    rel = (boxes[found] - np.tile(centre[found], 2)) / scale[found]
    mean_rel = rel.mean(0)
    boxes[~found] = np.tile(centre[~found], 2) + mean_rel * scale[~found]
    return boxes.astype(np.float32)


class LandmarkData:
    """Images (kept in memory), ground-truth 5 points and detector boxes of landmark folders."""

    def __init__(self, folders: list[Path], cache: Path | None = None, progress: bool = True):
        self.samples = [pair for folder in folders for pair in landmark_files(folder)]
        self.images = [load_image(img) for img, _ in self.samples]
        self.points = np.stack([read_points(p)[:NUM_LANDMARKS] for _, p in self.samples]).astype(np.float64)
        det = detect_samples(self.samples, cache, progress)
        self.detected = np.isfinite(det["boxes"]).all(1)
        self.det_boxes = det["boxes"]
        self.det_landmarks = det["landmarks"]
        self.boxes = fallback_boxes(self.points, det["boxes"])

    def __len__(self) -> int:
        return len(self.samples)

    def base_angles(self, geometry: AlignerGeometry) -> np.ndarray:
        """(N,) eye-line angle (radians) the runtime would level each crop by: the detector's points
        (the ground truth where it missed), or zeros without ``derotate``."""
        if not geometry.derotate:
            return np.zeros(len(self))
        return np.array([eye_angle(self.det_landmarks[j] if self.detected[j] else self.points[j])
                         for j in range(len(self))])

    def runtime_crops(self, geometry: AlignerGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Runtime-identical RGB crops and image→crop matrices of every sample, from the detector boxes
        (levelled by the detector's points with ``derotate``)."""
        crops, mats = [], []
        for i, image in enumerate(self.images):
            crop, m = face_crop(image, self.boxes[i], geometry, self.det_landmarks[i] if self.detected[i] else None)
            crops.append(crop)
            mats.append(m)
        return np.stack(crops), np.stack(mats)


class Augmenter:
    """Random training view of one sample: rotation, scale, translation, flip (left/right swapped),
    colour jitter, grayscale and blur, all drawn from one numpy Generator (its state is checkpointed).

    ``cfg`` is the config's ``augment`` section; missing keys take :data:`ALIGNER_DEFAULTS`' values."""

    def __init__(self, geometry: AlignerGeometry, cfg: dict[str, Any] | None, rng: np.random.Generator):
        self.geometry = geometry
        self.cfg = {**ALIGNER_DEFAULTS["augment"], **(cfg or {})}
        self.rng = rng

    def __call__(self, image: np.ndarray, box: np.ndarray, points: np.ndarray,
                 base_angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 crop, (5, 2) points in crop pixels); ``base_angle`` (radians) is the eye-line angle the
        runtime would level (``derotate``); the random rotation is applied on top of it."""
        c, r, g = self.cfg, self.rng, self.geometry
        angle = math.radians(r.uniform(-c["rotation"], c["rotation"])) if r.random() < c["rotation_p"] else 0.0
        angle += base_angle
        scale = r.uniform(*c["scale"])
        shift = tuple(r.uniform(-c["translate"], c["translate"], size=2))
        m = crop_matrix(box, g, angle=angle, scale=scale, shift=shift)
        crop = crop_face(image, m, g.input_size)
        pts = transform_points(points, m)
        if r.random() < c["flip"]:
            crop = np.ascontiguousarray(crop[:, ::-1])
            pts = flip_landmarks(pts, g.input_size[1]).astype(np.float64)
        crop = self.colour(crop)
        return np.ascontiguousarray(crop[..., ::-1]), pts

    def colour(self, bgr: np.ndarray) -> np.ndarray:
        """Grayscale or saturation jitter, then brightness, contrast and (sometimes) blur."""
        c, r = self.cfg, self.rng
        x = bgr.astype(np.float32)
        if r.random() < c["grayscale"]:
            gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
            x = np.repeat(gray[..., None], 3, axis=2)
        else:
            gray = x.mean(2, keepdims=True)
            x = gray + (x - gray) * (1 + r.uniform(-c["saturation"], c["saturation"]))
        x = x * (1 + r.uniform(-c["brightness"], c["brightness"]))
        mean = x.mean()
        x = mean + (x - mean) * (1 + r.uniform(-c["contrast"], c["contrast"]))
        if r.random() < c["blur"]:
            x = cv2.GaussianBlur(x, (0, 0), r.uniform(0.5, 1.5))
        return np.clip(x, 0, 255).astype(np.uint8)


def make_batch(crops: list[np.ndarray], points: list[np.ndarray], geometry: AlignerGeometry
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input (N,3,H,W), Gaussian target heatmaps (N,5,h,w) and the target points in heatmap pixels
    (N,5,2) for RGB crops and crop-pixel points."""
    x = to_model_input(np.stack(crops), aligner_spec(geometry), color_order="RGB")
    hm_points = np.stack([crop_to_heatmap(p, geometry.stride) for p in points])
    y = np.stack([encode_heatmaps(p, geometry.heatmap_size, geometry.sigma) for p in hm_points])
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(hm_points.astype(np.float32))

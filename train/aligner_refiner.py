"""The aligner in PyTorch, used like the runtime's ONNX :class:`runtime.landmarks.LandmarkRefiner`.

    refiner = TorchRefiner("runs/aligner_default/last.pt")   # train.aligner.load_refiner also opens exports
    points = refiner.refine(image_bgr, box, detector_points)

Crops, decoding and flip-test come from :mod:`runtime.landmarks` (:func:`~runtime.landmarks.predict_with_peaks`),
so a checkpoint and its export give the same points.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from evaluation.landmarks import failure_rate, nme
from runtime.landmark_fallback import FallbackRule, Refined, apply_fallback
from runtime.landmarks import AlignerGeometry, face_crops, predict_with_peaks

from .checkpoint import build_model_from_checkpoint
from .hourglass import full_config
from .landmark_data import LandmarkData


@torch.no_grad()
def predict_torch(model: nn.Module, crops: np.ndarray, mats: np.ndarray, geometry: AlignerGeometry,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5, 2) image-pixel landmarks and (N, 5) heatmap peaks from a PyTorch aligner for prepared RGB
    crops (the runtime's :func:`runtime.landmarks.predict_with_peaks`, with the network in PyTorch)."""
    was_training = model.training
    model.eval()
    try:
        return predict_with_peaks(lambda x: model(torch.from_numpy(x)).numpy(), crops, mats, geometry, batch_size)
    finally:
        model.train(was_training)


class TorchRefiner:
    """An aligner checkpoint used like :class:`runtime.landmarks.LandmarkRefiner` (``refine``,
    ``refine_many``, ``refine_details``; the fallback rule of its config, as the export carries it)."""

    def __init__(self, checkpoint: str | os.PathLike, fallback: bool | None = None):
        self.path = str(checkpoint)
        self.model, config = build_model_from_checkpoint(checkpoint)
        if config.get("task") != "landmarks":
            raise ValueError(f"{checkpoint}: not an aligner checkpoint (config task is {config.get('task')!r})")
        self.geometry = AlignerGeometry.from_dict(full_config(config))
        rule = FallbackRule.from_metadata(config)
        self.fallback = rule if fallback is not False else None

    def refine_details(self, image_bgr: np.ndarray, boxes, landmarks=None) -> Refined:
        """Points returned, the aligner's own, their peaks and where the fallback rule kept them."""
        crops, mats = face_crops(image_bgr, boxes, self.geometry, landmarks)
        points, peaks = predict_torch(self.model, crops, mats, self.geometry)
        return apply_fallback(self.fallback, points, peaks, landmarks)

    def refine_many(self, image_bgr: np.ndarray, boxes, landmarks=None) -> np.ndarray:
        """(N, 5, 2) landmarks for several faces of one image."""
        return self.refine_details(image_bgr, boxes, landmarks).points

    def refine(self, image_bgr: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """(5, 2) landmarks of the face in ``box``."""
        return self.refine_many(image_bgr, [box], None if landmarks is None else [landmarks])[0]


def evaluate_model(model: nn.Module, data: LandmarkData, geometry: AlignerGeometry,
                   rule: FallbackRule | None = None) -> dict[str, float]:
    """NME / failure rate of the aligner and of the detector's points on the faces the detector found;
    with a fallback ``rule`` also of the points the runtime returns and the fraction it keeps."""
    crops, mats = data.runtime_crops(geometry)
    pred, peaks = predict_torch(model, crops, mats, geometry)
    found = data.detected
    a = nme(pred[found], data.points[found])
    d = nme(data.det_landmarks[found], data.points[found])
    out = {"nme": float(a.mean()), "failure_rate": failure_rate(a),
           "detector_nme": float(d.mean()), "detector_failure_rate": failure_rate(d),
           "images": int(found.sum()), "missed": int((~found).sum())}
    if rule is not None:
        fused = apply_fallback(rule, pred[found], peaks[found], data.det_landmarks[found])
        out.update(fallback_nme=float(nme(fused.points, data.points[found]).mean()), kept=float(fused.kept.mean()))
    return out

"""The aligner's fallback rule: per face, keep the aligner's 5 points only where its heatmaps are confident
and its points agree with the detector's; elsewhere (profiles, faces unlike its training data) return the
detector's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import LANDMARK_NAMES


def disagreement(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean point distance between (N, 5, 2) ``points`` and ``reference``, over the reference's inter-ocular
    distance (infinite where the reference's eyes coincide): (N,)."""
    p = np.asarray(points, np.float64).reshape(-1, len(LANDMARK_NAMES), 2)
    r = np.asarray(reference, np.float64).reshape(-1, len(LANDMARK_NAMES), 2)
    iod = np.linalg.norm(r[:, 0] - r[:, 1], axis=-1)
    dist = np.linalg.norm(p - r, axis=-1).mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(iod > 0, dist / np.maximum(iod, 1e-12), np.inf)


@dataclass(frozen=True)
class FallbackRule:
    """When the aligner's points are kept over the detector's, per face: its weakest heatmap peak is at
    least ``min_peak`` and its points lie within ``max_disagreement`` (:func:`disagreement`, a fraction of
    the detector's inter-ocular distance) of the detector's. Outside that range (profiles, faces unlike
    its training data) the detector's points are used. Stored in an aligner's metadata as ``fallback``.
    """

    min_peak: float
    max_disagreement: float

    def keep(self, points: np.ndarray, peaks: np.ndarray, detector_points: np.ndarray) -> np.ndarray:
        """(N,) True where the aligner's points are kept."""
        peaks = np.asarray(peaks, np.float64).reshape(len(points), -1)
        return (peaks.min(1) >= self.min_peak) & (disagreement(points, detector_points) <= self.max_disagreement)

    def to_dict(self) -> dict[str, float]:
        return {"min_peak": float(self.min_peak), "max_disagreement": float(self.max_disagreement)}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "FallbackRule | None":
        """The rule in an aligner's metadata (``fallback``: ``{min_peak, max_disagreement}``), or None."""
        rule = meta.get("fallback")
        if rule is None:
            return None
        if not isinstance(rule, dict) or not {"min_peak", "max_disagreement"} <= set(rule):
            raise ValueError(f"aligner metadata 'fallback' must hold min_peak and max_disagreement, got {rule!r}")
        return cls(float(rule["min_peak"]), float(rule["max_disagreement"]))


@dataclass
class Refined:
    """What the aligner made of N faces: the ``points`` returned (N, 5, 2), the aligner's own ``aligner``
    points, their heatmap ``peaks`` (N, 5), and ``kept`` (N,): True where the aligner's points were
    returned, False where the fallback rule returned the detector's."""

    points: np.ndarray
    aligner: np.ndarray
    peaks: np.ndarray
    kept: np.ndarray


def apply_fallback(rule: FallbackRule | None, points: np.ndarray, peaks: np.ndarray,
                   detector_points: np.ndarray | None) -> Refined:
    """The aligner's ``points`` where ``rule`` keeps them, the detector's elsewhere (all the aligner's
    without a rule or without detector points)."""
    kept = np.ones(len(points), bool)
    out = points
    if rule is not None and detector_points is not None and len(points):
        init = np.asarray(detector_points, np.float32).reshape(points.shape)
        kept = rule.keep(points, peaks, init) | ~np.isfinite(init).all((1, 2))  # no points to fall back to
        out = np.where(kept[:, None, None], points, init)
    return Refined(out, points, peaks, kept)

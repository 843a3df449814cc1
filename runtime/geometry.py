"""Face geometry, defined once: the 5-point template, similarity estimation and the warp.

Everything that crops a face (training data preparation, the runtime pipeline, export checks)
imports from here, so training and deployment cannot drift apart.
"""
from __future__ import annotations

import numpy as np
import cv2

#: Order of the five landmarks everywhere in facekit, as they appear in the image.
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose_tip", "left_mouth", "right_mouth")

#: insightface's ArcFace template for a 112×112 crop, (x, y) pixels, in LANDMARK_NAMES order.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

#: dlib's 150×150 face chip (``get_face_chip``, padding 0.25) seen by facekit's landmarks: the mean RetinaFace
#: points on dlib chips of 280 CelebA photos, mirrored about the chip's centre column
#: (``python -m train.dlib_import --measure-template $FACEKIT_DATA/celeba --limit 300``). The preprocessing of recognizers imported from dlib
#: (``runtime.preprocess.DLIB_CHIP_SPEC``): warping onto it reproduces the framing dlib's network was trained on.
DLIB_CHIP_TEMPLATE_150 = np.array(
    [
        [48.23, 45.49],
        [100.77, 45.49],
        [74.50, 77.93],
        [51.67, 100.85],
        [97.33, 100.85],
    ],
    dtype=np.float32,
)

#: Landmark index pairs that swap under a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (3, 4))


def template_for_size(size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """The ArcFace template scaled to an (height, width) crop size."""
    h, w = size
    return ARCFACE_TEMPLATE_112 * np.array([w / 112.0, h / 112.0], dtype=np.float32)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama, no reflection) mapping ``src`` points onto ``dst``.

    Returns a 2×3 float64 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    if not np.all(np.isfinite(src)):
        raise ValueError("landmarks contain NaN or infinity")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("landmarks are degenerate (all at one point)")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine matrix to N×2 points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def check_template(template: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``template`` as a 5×2 float32 array; ValueError unless it is finite, inside a ``size`` (h, w) crop,
    with the eyes apart and above the mouth (a template that would warp faces upside down or to a point)."""
    t = np.asarray(template, dtype=np.float32)
    h, w = size
    if t.shape != (5, 2) or not np.all(np.isfinite(t)):
        raise ValueError(f"an alignment template is 5 finite (x, y) points, got shape {t.shape}")
    if t[:, 0].min() < 0 or t[:, 1].min() < 0 or t[:, 0].max() > w or t[:, 1].max() > h:
        raise ValueError(f"alignment template {t.tolist()} lies outside the {h}×{w} crop")
    if not (t[1, 0] - t[0, 0] > 0.05 * w and t[3:, 1].mean() > t[:2, 1].mean()):
        raise ValueError(f"alignment template {t.tolist()} is not a face (eyes left to right, above the mouth)")
    return t


def alignment_matrix(landmarks: np.ndarray, size: tuple[int, int] = (112, 112),
                     template: np.ndarray | None = None) -> np.ndarray:
    """Similarity matrix that maps 5 image landmarks onto ``template`` (default: the ArcFace template
    scaled to a crop of ``size`` (h, w))."""
    dst = template_for_size(size) if template is None else np.asarray(template, np.float32)
    return estimate_similarity(np.asarray(landmarks).reshape(5, 2), dst)


def warp_face(image: np.ndarray, landmarks: np.ndarray, size: tuple[int, int] = (112, 112),
              template: np.ndarray | None = None) -> np.ndarray:
    """Crop one face: similarity-warp ``image`` so its 5 landmarks land on ``template`` (default: the
    ArcFace template for ``size``).

    The colour order of ``image`` is kept; the crop is ``size`` (h, w), borders are black.
    """
    m = alignment_matrix(landmarks, size, template)
    h, w = size
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally flipped image (x mirrored, left/right swapped)."""
    pts = np.array(landmarks, dtype=np.float32).reshape(-1, 2).copy()
    pts[:, 0] = width - 1 - pts[:, 0]
    for a, b in FLIP_PAIRS:
        pts[[a, b]] = pts[[b, a]]
    return pts

"""A real face for numerical checks: a public-domain portrait shipped with the runtime (``models/sample_face.*``).

Reduced-precision builds (OpenVINO bf16) are checked against full precision on real inputs made from it:
aligned crops in a recognizer's framing (:func:`sample_crops`), the whole photo for a detector
(:func:`sample_image`), its box for an aligner (:func:`sample_face`). Not for accuracy figures: it is one face.
"""
from __future__ import annotations

import functools
import json
import math

import cv2
import numpy as np

from . import shipped
from .geometry import transform_points
from .preprocess import PreprocessSpec

SAMPLE_INFO = shipped.SAMPLE_FACE_INFO
SAMPLE_DIR = shipped.MODELS_DIR

#: (rotation degrees, scale, gamma, grey) of each variant crop; each also runs mirrored
_VARIANTS = ((0, 1.0, 1.0, False), (-8, 1.0, 1.0, False), (8, 1.0, 1.0, False), (0, 0.92, 1.0, False),
             (0, 1.08, 1.0, False), (0, 1.0, 0.7, False), (0, 1.0, 1.4, False), (4, 0.96, 1.0, True))


@functools.lru_cache(maxsize=1)
def _info() -> dict:
    return json.loads(SAMPLE_INFO.read_text())


def sample_image() -> np.ndarray:
    """The portrait, uint8 BGR (a copy)."""
    img = cv2.imread(str(SAMPLE_DIR / _info()["image"]), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"{SAMPLE_DIR / _info()['image']}: the runtime's sample face is missing")
    return img


def sample_face() -> tuple[np.ndarray, np.ndarray]:
    """The portrait's face: box (4,) x1,y1,x2,y2 and 5 landmarks (5, 2), float32 image pixels."""
    info = _info()
    return np.asarray(info["box"], np.float32), np.asarray(info["landmarks"], np.float32)


def sample_crops(spec: PreprocessSpec) -> np.ndarray:
    """16 aligned uint8 BGR crops of the face in ``spec``'s framing: small rotations, scales, exposure and
    grey variants of the detected landmarks' warp, and the mirror image of each."""
    image = sample_image()
    _, points = sample_face()
    centre = points.mean(0)
    crops = []
    for degrees, scale, gamma, grey in _VARIANTS:
        a = math.radians(degrees)
        m = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        moved = transform_points(points, np.hstack([m, (centre - m @ centre)[:, None]]))
        crop = spec.warp(image, moved)
        if gamma != 1.0:
            crop = np.clip(255.0 * (crop / 255.0) ** gamma, 0, 255).astype(np.uint8)
        if grey:
            crop = cv2.cvtColor(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        crops.append(crop)
    crops = np.stack(crops)
    return np.concatenate([crops, crops[:, :, ::-1]])

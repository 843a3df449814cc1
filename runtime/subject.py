"""Which face of a photo is its subject: one rule for the pipeline, data-set crops and training crops.

The rule is insightface's LFW alignment rule: the subject is the face with the highest
``area − 2 · |box centre − image centre|²`` (pixels²), so a big, central face wins over a bigger face at
the edge. Two optional refusals serve data preparation, where a wrong label is worse than a missing crop:
``min_face`` ignores faces whose shorter box side is below it ("face too small" when none is left), and
``dominance`` > 0 refuses a photo in which another face is nearly as prominent as the subject ("several
faces"): prominence is box area × detection score² (a doubtful detection — a poster, a pattern — counts
little), and the subject must be at least ``dominance`` times as prominent as every other face.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NO_FACE, FACE_TOO_SMALL, SEVERAL_FACES = "no face", "face too small", "several faces"


def subject_scores(boxes: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """The rule's score of each box (x1, y1, x2, y2) in an image of ``image_shape`` (h, w, ...)."""
    h, w = image_shape[:2]
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    offset = ((b[:, 0] + b[:, 2]) / 2 - w / 2) ** 2 + ((b[:, 1] + b[:, 3]) / 2 - h / 2) ** 2
    return area - 2.0 * offset


def choose_subject(boxes: np.ndarray | Sequence, image_shape: Sequence[int], min_face: float = 0.0,
                   dominance: float = 0.0, scores: Sequence[float] | None = None) -> tuple[int | None, str]:
    """Index of the subject among ``boxes`` and ``""``, or ``(None, reason)``: :data:`NO_FACE`,
    :data:`FACE_TOO_SMALL` or :data:`SEVERAL_FACES` (see the module docstring). ``scores`` are the detection
    scores (used by the ``dominance`` check only; default 1)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(b) == 0:
        return None, NO_FACE
    sides = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    big = np.flatnonzero(sides >= min_face)
    if big.size == 0:
        return None, FACE_TOO_SMALL
    rank = subject_scores(b[big], image_shape)
    best = int(big[int(np.argmax(rank))])  # the first of equal scores
    if dominance > 0 and len(big) > 1:
        conf = np.ones(len(b)) if scores is None else np.asarray(scores, np.float64).reshape(-1)
        prominence = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * conf ** 2
        others = prominence[[i for i in big if i != best]]
        if prominence[best] < dominance * others.max():
            return None, SEVERAL_FACES
    return best, ""

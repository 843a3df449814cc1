"""What the pipeline returns: faces, the subject of a photo, per-image results of ``embed_many`` and
comparisons (plain data, no models)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .detector import Detection


class NoFaceError(ValueError):
    """An image that must contain a face (e.g. for :meth:`FacePipeline.compare`) has none."""


@dataclass
class Face:
    """One face: ``box`` x1,y1,x2,y2 and ``landmarks`` (5,2) in the input's pixels (float32; for a large
    JPEG decoded reduced, still the file's pixels), detector ``score``, and the L2-normalised
    ``embedding`` (float32) once embedded, else None."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    def to_dict(self, with_embedding: bool = False) -> dict[str, Any]:
        """JSON-friendly form: ``box`` [x1,y1,x2,y2], ``score``, ``landmarks`` [[x,y]×5] (+ ``embedding``)."""
        d = Detection(self.box, self.score, self.landmarks).to_dict()
        if with_embedding and self.embedding is not None:
            d["embedding"] = [float(v) for v in self.embedding]
        return d


@dataclass
class Subject:
    """The subject of one photo (:mod:`runtime.subject`'s rule): every detected ``faces``, the chosen
    ``face`` (its landmarks refined in ``landmarks="aligner"`` mode; not embedded) or None with the
    ``reason``, the detection ``threshold`` that found it, and the decoded BGR ``image``. Coordinates are
    the file's pixels; ``image`` shows the file at ``scale`` (below 1 for a large JPEG decoded reduced),
    so ``landmarks * scale`` index ``image``."""

    image: np.ndarray = field(repr=False)
    faces: list[Face]
    face: Face | None
    reason: str = ""
    threshold: float = 0.5
    scale: float = 1.0


@dataclass
class ImageFaces:
    """One image's result from :meth:`FacePipeline.embed_many`: its position ``index`` in the input and its
    ``source`` label; the ``faces`` found (all embedded; with ``subject=True`` only the chosen ``face`` is,
    or it is None with the subject rule's ``reason``), or the ``error`` that made the image unusable."""

    index: int
    source: str
    faces: list[Face] = field(default_factory=list)
    face: Face | None = None
    reason: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Comparison:
    """Result of :meth:`FacePipeline.compare`: cosine ``similarity`` of the subject face of each image and
    the verdict ``same`` at ``threshold`` (None when the recognizer carries no threshold)."""

    similarity: float
    same: bool | None
    threshold: float | None
    face_a: Face = field(repr=False)
    face_b: Face = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"similarity": round(self.similarity, 6), "same": self.same}

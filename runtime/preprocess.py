"""Preprocessing, defined once: crop size, colour order, mean/std and the tensor layout.

Training (``train/``), export (``export/``) and the runtime all call :func:`to_model_input` through a
:class:`PreprocessSpec`; exported models carry the spec in their metadata (see :mod:`runtime.metadata`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .geometry import (ARCFACE_TEMPLATE_112, DLIB_CHIP_TEMPLATE_150, LANDMARK_NAMES, check_template, template_for_size,
                       warp_face)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an aligned face crop becomes a model input tensor.

    ``input_size`` is (height, width); ``color_order`` is the channel order the model expects;
    the tensor is ``(pixel - mean) / std`` in NCHW float32.
    """

    input_size: tuple[int, int] = (112, 112)
    color_order: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    layout: str = "NCHW"
    template: tuple[tuple[float, float], ...] = field(
        default_factory=lambda: tuple(map(tuple, ARCFACE_TEMPLATE_112.tolist()))
    )
    landmark_order: tuple[str, ...] = LANDMARK_NAMES

    @property
    def crop_template(self) -> np.ndarray:
        """The 5 points (x, y) faces are warped onto in an ``input_size`` crop. The 112×112 ArcFace template
        given for another size means that template scaled to it (how facekit models always used it)."""
        t = np.asarray(self.template, np.float32)
        if tuple(self.input_size) != (112, 112) and np.allclose(t, ARCFACE_TEMPLATE_112, atol=1e-3):
            return template_for_size(tuple(self.input_size))
        return t

    def warp(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The aligned ``input_size`` crop of the face with 5 ``landmarks`` in ``image`` (colour order kept)."""
        return warp_face(image, landmarks, tuple(self.input_size), self.crop_template)

    def check(self) -> "PreprocessSpec":
        """Self, after checking that its template fits its crop (ValueError otherwise)."""
        check_template(self.crop_template, tuple(self.input_size))
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["template"] = [list(p) for p in self.template]
        d["landmark_order"] = list(self.landmark_order)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        missing = [k for k in ("input_size", "color_order", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"preprocessing metadata lacks {', '.join(missing)}")
        color = str(d["color_order"]).upper()
        if color not in ("RGB", "BGR"):
            raise ValueError(f"unknown color_order {d['color_order']!r} (expected RGB or BGR)")
        kw = dict(
            input_size=tuple(int(v) for v in d["input_size"]),
            color_order=color,
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            layout=str(d.get("layout", "NCHW")),
        )
        if "template" in d:
            kw["template"] = tuple(tuple(float(v) for v in p) for p in d["template"])
        if "landmark_order" in d:
            kw["landmark_order"] = tuple(d["landmark_order"])
        return cls(**kw)


#: The recognizer preprocessing used by every facekit model unless its metadata says otherwise.
RECOGNIZER_SPEC = PreprocessSpec()
#: Networks imported from dlib (``train/dlib_import.py``): a 150×150 crop framed like dlib's face chips, the
#: usual ``(x − 127.5) / 127.5`` RGB tensor (dlib's own input scaling is folded into the network).
DLIB_CHIP_SPEC = PreprocessSpec(input_size=(150, 150), template=tuple(map(tuple, DLIB_CHIP_TEMPLATE_150.tolist())))


def spec_from_config(config: dict) -> PreprocessSpec:
    """The preprocessing a training config (or checkpoint config) declares: its ``preprocess`` dict,
    else :data:`RECOGNIZER_SPEC`."""
    d = config.get("preprocess")
    return PreprocessSpec.from_dict(d).check() if isinstance(d, dict) else RECOGNIZER_SPEC


def to_model_input(crops: np.ndarray, spec: PreprocessSpec = RECOGNIZER_SPEC, color_order: str = "RGB") -> np.ndarray:
    """Turn aligned uint8 crops (N×H×W×3 or H×W×3, in ``color_order``) into the model's float32 NCHW tensor."""
    x = np.asarray(crops)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected N×H×W×3 crops, got shape {x.shape}")
    if tuple(x.shape[1:3]) != tuple(spec.input_size):
        raise ValueError(f"crops are {x.shape[1]}×{x.shape[2]}, the model expects {spec.input_size[0]}×{spec.input_size[1]}")
    if color_order.upper() != spec.color_order:
        x = x[..., ::-1]
    x = (x.astype(np.float32) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def mirror(crops: np.ndarray) -> np.ndarray:
    """N×H×W×C crops flipped left to right (contiguous)."""
    return np.ascontiguousarray(np.asarray(crops)[:, :, ::-1])


def flip_sum(embed: Callable[[np.ndarray], np.ndarray], crops: np.ndarray) -> np.ndarray:
    """Test-time flip (insightface protocol): ``embed(crops) + embed(mirror(crops))`` for N×H×W×3 crops,
    unnormalised (``l2_normalize`` it). ``embed`` maps a crop batch to raw embeddings; it is called once, on
    the crops and their mirror images together (one batch of 2N runs faster than two batches of N)."""
    crops = np.asarray(crops)
    both = np.asarray(embed(np.concatenate([crops, mirror(crops)])), np.float32)
    return both[:len(crops)] + both[len(crops):]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of N×D (or one D-vector) in float32, as insightface's
    ``sklearn.preprocessing.normalize``: rows of zeros stay zeros."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        return l2_normalize(x[None])[0]
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    norms[norms == 0] = 1.0
    return x / norms

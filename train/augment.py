"""Augmentations on aligned uint8 crops (H×W×3, BGR as OpenCV reads them), driven by an explicit RNG.

Every op takes ``(image, rng)`` and returns a new uint8 image of the same shape, so a sample's augmentation
is a pure function of its seed (exact resume, any number of workers). Presets:

* ``none``; ``flip`` (horizontal flip, p=0.5);
* ``colour``: flip + the course projects' colour set (grayscale, colour jitter, Gaussian blur, posterize,
  equalize, each with its own probability);
* ``occlusion``: flip + cutout + half-face occlusion;
* ``strong``: flip + small similarity jitter of the crop + colour set + cutout + half-face occlusion.

A config may also give a list of op names (``[flip, jitter, colour, cutout, occlusion]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def hflip(img: np.ndarray) -> np.ndarray:
    """Horizontal mirror (contiguous copy)."""
    return np.ascontiguousarray(img[:, ::-1])


def grayscale(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)


def colour_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3, contrast: float = 0.3,
                  saturation: float = 0.3, hue: float = 0.05) -> np.ndarray:
    """Brightness, contrast, saturation and hue changes in random order (torchvision ColorJitter style)."""
    x = img.astype(np.float32)
    for op in rng.permutation(4):
        if op == 0:
            x = x * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1:
            mean = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY).mean()
            x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
        elif op == 2:
            g = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY).astype(np.float32)[..., None]
            x = (x - g) * rng.uniform(1 - saturation, 1 + saturation) + g
        else:
            hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV)
            shift = int(round(rng.uniform(-hue, hue) * 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (0.1, 1.5)) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(*sigma)))


def posterize(img: np.ndarray, rng: np.random.Generator, bits: tuple[int, int] = (4, 6)) -> np.ndarray:
    b = int(rng.integers(bits[0], bits[1] + 1))
    return img & np.uint8((0xFF << (8 - b)) & 0xFF)


def equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel histogram equalisation (PIL ImageOps.equalize style)."""
    return cv2.merge([cv2.equalizeHist(np.ascontiguousarray(c)) for c in cv2.split(img)])


def cutout(img: np.ndarray, rng: np.random.Generator, size: tuple[float, float] = (0.15, 0.4)) -> np.ndarray:
    """Fill one random rectangle (side a random fraction of the crop) with a random grey level."""
    h, w = img.shape[:2]
    ch, cw = (np.array(rng.uniform(*size, 2)) * (h, w)).astype(int)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = img.copy()
    out[y:y + ch, x:x + cw] = np.uint8(rng.integers(0, 256))
    return out


def half_face_occlusion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hide the left, right or lower half of the aligned face (a hand, a profile shadow, a mask)."""
    h, w = img.shape[:2]
    out = img.copy()
    fill = np.uint8(rng.integers(0, 256))
    side = int(rng.integers(3))
    if side == 0:
        out[:, : w // 2] = fill
    elif side == 1:
        out[:, w // 2:] = fill
    else:
        out[int(h * 0.62):, :] = fill  # below the nose tip of the 112×112 template (y ≈ 71.7)
    return out


def similarity_jitter(img: np.ndarray, rng: np.random.Generator, max_angle: float = 8.0,
                      max_scale: float = 0.06, max_shift: float = 0.04) -> np.ndarray:
    """A small random rotation / scale / shift of the aligned crop (alignment noise the runtime will see)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-max_angle, max_angle)),
                                float(rng.uniform(1 - max_scale, 1 + max_scale)))
    m[:, 2] += rng.uniform(-max_shift, max_shift, 2) * (w, h)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


@dataclass
class Step:
    """An op applied with probability ``p``."""

    name: str
    fn: Op
    p: float


COLOUR_STEPS = [
    Step("grayscale", grayscale, 0.2),
    Step("colour_jitter", colour_jitter, 0.8),
    Step("gaussian_blur", gaussian_blur, 0.2),
    Step("posterize", posterize, 0.2),
    Step("equalize", equalize, 0.2),
]

#: op name → steps it expands to (``flip`` is handled separately: the dataset must know whether it happened).
OPS: dict[str, list[Step]] = {
    "jitter": [Step("similarity_jitter", similarity_jitter, 0.5)],
    "colour": COLOUR_STEPS,
    "cutout": [Step("cutout", cutout, 0.3)],
    "occlusion": [Step("half_face_occlusion", half_face_occlusion, 0.1)],
}

PRESETS: dict[str, list[str]] = {
    "none": [],
    "flip": ["flip"],
    "colour": ["flip", "colour"],
    "occlusion": ["flip", "cutout", "occlusion"],
    "strong": ["flip", "jitter", "colour", "cutout", "occlusion"],
}


@dataclass
class Augmenter:
    """A sequence of random steps plus an optional horizontal flip (p=0.5), applied in a fixed order."""

    flip: bool = False
    steps: list[Step] = field(default_factory=list)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """Augmented copy of ``img`` and whether it was flipped."""
        flipped = bool(self.flip and rng.random() < 0.5)
        if flipped:
            img = hflip(img)
        for s in self.steps:
            if rng.random() < s.p:
                img = s.fn(img, rng)
        return img, flipped

    @property
    def names(self) -> list[str]:
        return (["flip"] if self.flip else []) + [s.name for s in self.steps]


def build_augmenter(spec: str | Sequence[str] | None) -> Augmenter:
    """An :class:`Augmenter` from a preset name or a list of op names; clear error for unknown names."""
    if spec is None:
        spec = "none"
    names = PRESETS.get(spec) if isinstance(spec, str) else list(spec)
    if names is None:
        raise ValueError(f"unknown augmentation preset {spec!r}; presets: {', '.join(PRESETS)}")
    aug = Augmenter()
    for n in names:
        if n == "flip":
            aug.flip = True
        elif n in OPS:
            aug.steps.extend(OPS[n])
        else:
            raise ValueError(f"unknown augmentation op {n!r}; ops: flip, {', '.join(OPS)}")
    return aug

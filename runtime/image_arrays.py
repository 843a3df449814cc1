"""Image arrays: the uint8 H×W×3 BGR form every input is normalised to, and :class:`ImageError`.

:func:`from_array` turns grayscale, alpha, 16-bit, bool, integer and float arrays into that form (or one
clear error); :func:`apply_orientation` rotates/flips for an EXIF orientation; :func:`downscale_for_detection`
shrinks for detection and says how coordinates map back.
"""
from __future__ import annotations

import cv2
import numpy as np

COLOR_ORDERS = ("BGR", "RGB")
#: Default pixel limit (width × height) of an image: 50 megapixels (~150 MB as BGR uint8).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An input could not be turned into an image. ``source`` names the input, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def from_array(arr: np.ndarray, color_order: str = "BGR", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str = "<array>") -> np.ndarray:
    """Normalise an image array to uint8 H×W×3 BGR.

    Shapes: H×W or H×W×1 (grayscale), H×W×3 (``color_order``), H×W×4 (alpha dropped). Depths: uint8;
    bool; uint16 scaled to 8 bits (``round(v / 257)``, i.e. 16-bit full scale even if the values are
    small); other integers must lie in 0..255; floats must be finite and lie in [0, 1] (scaled by 255)
    or in [0, 255] — an array whose maximum is ≤ 1 is read as [0, 1]. ``max_pixels`` (None: no limit)
    bounds height × width.
    """
    order = check_color_order(color_order)
    if not isinstance(arr, np.ndarray):
        raise ImageError(name, f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(name, f"array of shape {arr.shape} is not an image (expected H×W, H×W×1, H×W×3 or H×W×4)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, f"array of shape {arr.shape} has no pixels")
    if max_pixels is not None and arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageError(name, f"array is {arr.shape[1]}×{arr.shape[0]}, over the max_pixels limit of {max_pixels}")
    arr = _to_uint8(arr, name)
    if arr.ndim == 2:
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2BGR)
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if order == "RGB":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    dt = arr.dtype
    if dt == np.uint8:
        return arr
    if dt == np.bool_:
        return arr.astype(np.uint8) * 255
    if dt == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(dt, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(name, f"{dt} values span {lo}..{hi}; expected 0..255 (or pass uint16 for 16-bit data)")
        return arr.astype(np.uint8)
    if np.issubdtype(dt, np.floating):
        a = arr.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ImageError(name, "float array contains NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        tol = 1e-3
        if lo < -tol or hi > 255.0 + tol:
            raise ImageError(name, f"float values span {lo:g}..{hi:g}; expected [0, 1] or [0, 255] "
                                   "(de-normalise model tensors before passing them)")
        scale = 255.0 if hi <= 1.0 + tol else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    raise ImageError(name, f"unsupported array dtype {dt}")


def check_color_order(color_order: str) -> str:
    """``"BGR"`` or ``"RGB"`` (BGRA/RGBA accepted, any case); ValueError for anything else."""
    order = str(color_order).upper()
    if order in ("BGRA", "RGBA"):
        order = order[:3]
    if order not in COLOR_ORDERS:
        raise ValueError(f"color_order must be 'BGR' or 'RGB', got {color_order!r}")
    return order


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip ``img`` so that it displays upright for the EXIF ``orientation`` value (1..8)."""
    if orientation == 2:
        out = img[:, ::-1]
    elif orientation == 3:
        out = img[::-1, ::-1]
    elif orientation == 4:
        out = img[::-1]
    elif orientation == 5:
        out = img.transpose(1, 0, 2)
    elif orientation == 6:
        out = img.transpose(1, 0, 2)[:, ::-1]
    elif orientation == 7:
        out = img.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        out = img.transpose(1, 0, 2)[::-1]
    else:
        return img
    return np.ascontiguousarray(out)


def downscale_for_detection(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink ``image`` so that its longer side is at most ``max_side``; never enlarge.

    Returns ``(image, scale)`` with ``resized_coordinate = original_coordinate * scale`` (the resize uses
    exactly this factor on both axes), so boxes found on the small image map back as ``box / scale``.
    ``scale`` is 1.0 and the image is returned as is when it is already small enough.
    """
    if int(max_side) < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    h, w = image.shape[:2]
    longest = max(h, w)
    if longest <= max_side:
        return image, 1.0
    scale = float(max_side) / float(longest)
    if round(min(h, w) * scale) >= 1:
        # cv2 computes dsize = round(size * scale) and maps pixels with exactly fx = fy = scale
        out = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    else:  # extreme aspect ratio: keep at least one pixel across
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return out, scale


__all__ = ["ImageError", "COLOR_ORDERS", "DEFAULT_MAX_PIXELS", "check_color_order", "from_array", "apply_orientation",
           "downscale_for_detection"]

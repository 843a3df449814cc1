"""Robust image input: every path, byte string or array becomes uint8 H×W×3 BGR, or one clear error.

:func:`load_image` accepts a file path, the encoded bytes of a file, or a numpy array (with its colour
order stated). Whatever goes wrong, it raises :class:`ImageError` naming the input and the reason, never
a traceback from inside Pillow, OpenCV or numpy.

What is checked, and when:

* files: missing, a directory, not a regular file, unreadable, empty, or larger than ``max_bytes``;
* the header, with Pillow and before any decoding (:mod:`runtime.image_header`): the format (JPEG, PNG,
  GIF, BMP, WebP, TIFF, PNM; anything else is refused), width × height against ``max_pixels``, so a
  decompression bomb costs microseconds and no memory, EXIF orientation, truncated PNGs and JPEGs;
* ``max_pixels`` bounds the *decoded* image: single-scan (baseline) JPEGs over it, what cameras and
  phones write, are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (DCT scaling: a 108-megapixel photo
  costs the memory of a 27-megapixel one); other files over it are refused; :func:`load_image_scaled`
  returns the scale with the image;
* decoding uses OpenCV (``IMREAD_UNCHANGED``, or ``IMREAD_REDUCED_COLOR_2/4/8`` for reduced JPEGs); the
  EXIF orientation read by Pillow (JPEG APP1, PNG eXIf, WebP EXIF) is applied here, because OpenCV is
  told to ignore it (TIFF: OpenCV's decoder applies the Orientation tag itself);
* channels and depth are normalised (:func:`from_array`): grayscale → BGR, alpha dropped, 16-bit scaled
  to 8-bit (``round(v / 257)``), CMYK JPEG converted to BGR by OpenCV, animated GIF → first frame.

Arrays follow the same normalisation; floats must lie in [0, 1] or [0, 255].
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np

from .image_arrays import (COLOR_ORDERS, DEFAULT_MAX_PIXELS, ImageError, apply_orientation, check_color_order,
                           downscale_for_detection, from_array)
from .image_header import JPEG_REDUCTIONS, MAX_JPEG_SCANS, ImageInfo, probe, sniff_format
from .messages import last_line
from .native_stderr import decoder_messages_silenced, native_messages_muted, silence_native_decoder_messages

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

#: Default limit on the size of an encoded file.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and its relation to the file.

    ``image`` (uint8 H×W×3 BGR) shows the file's picture at ``scale`` (1.0; 1/2, 1/4 or 1/8 for a large
    JPEG decoded reduced): a point (x, y) of ``image`` is (x / scale, y / scale) in the file's pixels.
    ``size`` is the file's (width, height) as displayed, i.e. after EXIF orientation.
    """

    image: np.ndarray
    scale: float
    size: tuple[int, int]


def load_image(src: ImageSource, color_order: str = "BGR", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               *, name: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Load ``src`` as a uint8 H×W×3 **BGR** array.

    ``src`` is a path, the encoded bytes of an image file, or an array. ``color_order`` ("BGR" or "RGB")
    is the channel order of a 3- or 4-channel *array* input; encoded files carry their own. ``max_pixels``
    (None: no limit) bounds the decoded width × height: files over it are refused from the header, except
    single-scan JPEGs, which come back decoded at 1/2, 1/4 or 1/8 scale (:func:`load_image_scaled` says
    which). ``max_bytes`` bounds the encoded size. ``name`` labels byte/array inputs in error messages
    (e.g. an upload's file name). The result may share memory with an array input that is already uint8
    BGR and contiguous.
    """
    return load_image_scaled(src, color_order, max_pixels, name=name, max_bytes=max_bytes).image


def load_image_scaled(src: ImageSource, color_order: str = "BGR", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      *, name: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> LoadedImage:
    """:func:`load_image`, returning the image with its scale relative to the file (:class:`LoadedImage`)."""
    order = check_color_order(color_order)
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(src)
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageError(label, f"{len(data)} bytes is over the {max_bytes}-byte limit")
        return _decode(data, label, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        data = read_file(src, max_bytes=max_bytes)
        return _decode(data, name or os.fspath(src), max_pixels)
    if isinstance(src, np.ndarray):
        arr, label = src, name or "<array>"
    elif hasattr(src, "__array_interface__") or hasattr(src, "__array__"):  # e.g. a PIL image
        label = name or type(src).__name__
        try:
            arr = np.asarray(src)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a bad input
            raise ImageError(label, f"cannot convert to an array ({e})") from None
    else:
        raise ImageError(name or type(src).__name__,
                         "unsupported input type; pass a path, encoded bytes or a numpy array")
    img = from_array(arr, order, max_pixels=max_pixels, name=label)
    return LoadedImage(img, 1.0, (img.shape[1], img.shape[0]))


def read_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, or :class:`ImageError` saying why it cannot be read."""
    label = os.fspath(path)
    if isinstance(label, bytes):
        label = os.fsdecode(label)
    if label == "":
        raise ImageError("<empty path>", "no file name given")
    try:
        st = os.stat(label)
    except FileNotFoundError:
        raise ImageError(label, "file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageError(label, f"cannot access file ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(label, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(label, "is not a regular file")
    if st.st_size == 0:
        raise ImageError(label, "file is empty")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ImageError(label, f"file is {st.st_size} bytes, over the {max_bytes}-byte limit")
    try:
        with open(label, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(label, f"cannot read file ({e.strerror or e})") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew while we looked
        raise ImageError(label, f"file is over the {max_bytes}-byte limit")
    return data


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (checked as described in the module docstring) to uint8 H×W×3 BGR."""
    return _decode(data, name, max_pixels).image


def _decode(data: bytes, name: str, max_pixels: int | None) -> LoadedImage:
    if len(data) == 0:
        raise ImageError(name, "empty (0 bytes)")
    info = probe(data, name, max_pixels=max_pixels)
    fmt = info.format
    flags = cv2.IMREAD_UNCHANGED if info.reduction == 1 else \
        JPEG_REDUCTIONS[info.reduction] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        with native_messages_muted():
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageError(name, f"cannot decode {fmt} ({last_line(e)})") from None
    if img is None or img.size == 0:
        raise ImageError(name, f"cannot decode {fmt} data (corrupt, truncated or an unsupported variant)")
    if max_pixels is not None and img.shape[0] * img.shape[1] > max_pixels:  # header lied
        raise ImageError(name, f"decoded {fmt} is {img.shape[1]}×{img.shape[0]}, over the max_pixels limit")
    img = apply_orientation(from_array(img, "BGR", max_pixels=None, name=name), info.orientation)
    size = (info.height, info.width) if info.orientation >= 5 else (info.width, info.height)
    return LoadedImage(img, 1.0 / info.reduction, size)


__all__ = ["ImageError", "ImageInfo", "LoadedImage", "load_image", "load_image_scaled", "decode_image",
           "read_file", "probe", "sniff_format", "from_array", "apply_orientation", "downscale_for_detection",
           "silence_native_decoder_messages", "decoder_messages_silenced", "DEFAULT_MAX_PIXELS",
           "DEFAULT_MAX_BYTES", "MAX_JPEG_SCANS", "COLOR_ORDERS", "ImageSource"]

"""What an image file's header says, read with Pillow before any pixel is decoded.

:func:`probe` names the format from the first bytes (JPEG, PNG, GIF, BMP, WebP, TIFF, PNM; anything else
is refused with a reason), then constructs Pillow's plugin for that format directly on the bytes: a
lazy open that reads width × height, mode and EXIF without decoding pixels and without Pillow's
process-wide ``Image.MAX_IMAGE_PIXELS`` check — facekit applies its own ``max_pixels`` per call, so
the host app's Pillow settings are neither relied on nor changed. On top of Pillow it refuses:

* images that cannot be decoded within ``max_pixels``: every format over it, except single-scan
  (baseline) JPEGs, which libjpeg decodes at 1/2, 1/4 or 1/8 scale (the least reduction that fits is
  returned); progressive and multi-scan JPEGs make libjpeg hold every DCT coefficient, at any scale;
* JPEGs whose header claims more pixels than their compressed data can hold (a decompression bomb);
* truncated files: a PNG whose chunks and CRCs Pillow's ``verify`` cannot walk to IEND, a JPEG without
  its end-of-image marker after the scan data; progressive JPEGs with more than 500 scans (CPU bombs).
"""
from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import cv2
from PIL import (BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, PpmImagePlugin,
                 TiffImagePlugin, WebPImagePlugin)

from .image_arrays import ImageError
from .messages import last_line
from .native_stderr import native_messages_muted

#: Progressive JPEGs with more scans than this are refused (a CPU-time bomb; libjpeg-turbo's own
#: TurboJPEG API uses 500).
MAX_JPEG_SCANS = 500
#: A JPEG must hold at least one byte of compressed data per this many pixels it claims: Huffman coding
#: spends at least 1 bit per 8×8 block and component (1 byte per 512 pixels), so only near-uniform
#: arithmetic-coded pictures fall below it besides forged headers.
JPEG_PIXELS_PER_BYTE = 1024
#: DCT reductions libjpeg decodes at, with OpenCV's flags for them (EXIF orientation is applied by facekit).
JPEG_REDUCTIONS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
SUPPORTED = "JPEG, PNG, GIF, BMP, WebP, TIFF, PNM"

_PILLOW_PLUGINS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile,
                   "GIF": GifImagePlugin.GifImageFile, "BMP": BmpImagePlugin.BmpImageFile,
                   "WebP": WebPImagePlugin.WebPImageFile, "PNM": PpmImagePlugin.PpmImageFile}
_EXIF_ORIENTATION = 0x0112
_IEND_CRC = zlib.crc32(b"IEND").to_bytes(4, "big")


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: ``format``, stored ``width`` × ``height``, EXIF ``orientation`` (1..8; TIFF
    reports 1, OpenCV's TIFF decoder applies the tag itself) and the DCT ``reduction`` (1, 2, 4 or 8) to
    decode at so that the image fits ``max_pixels``."""

    format: str
    width: int
    height: int
    orientation: int = 1
    reduction: int = 1


class _HeaderError(Exception):
    """A problem found by facekit's own checks, reported as an ImageError by :func:`probe`."""


def probe(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> ImageInfo:
    """Format, size, EXIF orientation and decode reduction from the header, without decoding pixels.

    Raises :class:`ImageError` for unknown formats, truncated or corrupt headers (and, for PNG and JPEG,
    truncated data), and for images that cannot be decoded within ``max_pixels`` (None: no limit).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(name, _unknown_format_reason(data))
    if fmt == "WebP":  # Pillow's WebP open builds libwebp's decoder, which allocates the canvas
        canvas = _webp_canvas(data)
        if canvas and max_pixels is not None and canvas[0] * canvas[1] > max_pixels:
            raise ImageError(name, f"{_over_limit(fmt, *canvas, max_pixels)} (refused before decoding)")
    fp = io.BytesIO(data)
    orientation, jpeg = 1, None
    try:
        with native_messages_muted():  # also Pillow's warnings about corrupt EXIF blocks
            if fmt == "TIFF":
                width, height = _tiff_size(fp)
            else:
                im = _PILLOW_PLUGINS[fmt](fp)
                width, height = im.size
                orientation = _exif_orientation(im)
                jpeg = _check_jpeg(im, fp, data, max_pixels) if fmt == "JPEG" else None
                if fmt == "PNG":
                    _check_png(im, fp, data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"{fmt} is over Pillow's process-wide Image.MAX_IMAGE_PIXELS "
                               f"({last_line(e)}); refused before decoding") from None
    except _HeaderError as e:
        raise ImageError(name, f"{fmt}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a plugin raises on malformed bytes is a bad header
        raise ImageError(name, f"{fmt}: {_header_reason(e, fmt, data, fp.tell())}") from None
    reduction = _reduction(fmt, width, height, jpeg, max_pixels, name)
    return ImageInfo(fmt, width, height, orientation, reduction)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes, or None."""
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456":
        return "PNM"
    return None


def _unknown_format_reason(data: bytes) -> str:
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("latin-1", "replace")
        return f"HEIF/AVIF/MP4 container (brand {brand!r}) is not a supported image format; convert it to JPEG or PNG"
    head = data[:64]
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return f"not an image: the file starts with text (supported: {SUPPORTED})"
    return f"not a recognised image format (supported: {SUPPORTED})"


def _header_reason(e: BaseException, fmt: str, data: bytes, pos: int) -> str:
    """One line for what a Pillow plugin raised on a malformed file (``pos``: where it stopped reading)."""
    text = last_line(e)
    if text == "not identified by this driver":  # Pillow: width or height ≤ 0, or no pixel mode
        return "invalid size or pixel mode in the header"
    if "bad header checksum" in text or (fmt == "PNG" and text.startswith("broken PNG file (chunk")
                                         and _png_crc_mismatch(data, pos - 8)):
        return f"corrupt: CRC mismatch ({text})"
    return f"truncated or corrupt ({text})"


def _png_crc_mismatch(data: bytes, start: int) -> bool:
    """Whether the complete PNG chunk at ``start`` carries a CRC that does not match its type and body."""
    end = start + 8 + int.from_bytes(data[start:start + 4], "big")
    return start >= 8 and end + 4 <= len(data) and \
        zlib.crc32(data[start + 4:end]) != int.from_bytes(data[end:end + 4], "big")


def _exif_orientation(im: Image.Image) -> int:
    """The orientation (1..8) in the EXIF block Pillow found in the header; 1 when absent or broken."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the picture for
        return 1
    return value if 1 <= value <= 8 else 1


def _check_png(im: Image.Image, fp: io.BytesIO, data: bytes) -> None:
    """Every chunk up to IEND present with a matching CRC (Pillow's ``verify``, which stops at IEND's type)."""
    im.verify()
    end = fp.tell()
    if end + 4 > len(data):
        raise _HeaderError("truncated: data ends inside the IEND chunk")
    if data[end:end + 4] != _IEND_CRC:
        raise _HeaderError("corrupt: CRC mismatch in chunk b'IEND'")


def _check_jpeg(im: Image.Image, fp: io.BytesIO, data: bytes, max_pixels: int | None) -> dict:
    """End-of-image marker after the scan data and the scan count; returns the compressed size and scans.

    Scans are counted (a pass over the data) for progressive JPEGs, where many cheap refinement scans
    are a CPU bomb, and for JPEGs over ``max_pixels``, where several scans rule out reduced decoding;
    in a sequential JPEG every scan costs compressed bytes, so its count cannot be a bomb.
    """
    if not im.tile:
        raise _HeaderError("truncated before the image data")
    scan = fp.tell()  # Pillow stops reading after the first start-of-scan header: entropy-coded data follows
    # In entropy-coded data every 0xFF is followed by 0x00 or RSTn, so EOI and SOS markers cannot occur
    # by chance: a missing EOI means the file was cut short (an EOI in an EXIF thumbnail comes earlier).
    end = data.rfind(b"\xff\xd9", scan)  # from the end: found at once in a complete file
    if end < 0:
        raise _HeaderError("truncated: no end-of-image marker after the scan data")
    progressive = bool(im.info.get("progressive"))
    over = max_pixels is not None and im.size[0] * im.size[1] > max_pixels
    scans = data.count(b"\xff\xda", scan, end) + 1 if progressive or over else 1
    if scans > MAX_JPEG_SCANS:
        raise _HeaderError(f"more than {MAX_JPEG_SCANS} progressive scans (refused as a CPU bomb)")
    return {"compressed_bytes": end - scan, "scans": scans}


def _tiff_size(fp: io.BytesIO) -> tuple[int, int]:
    """ImageWidth × ImageLength of a TIFF's first IFD, read with Pillow's tag reader (which, unlike its
    TIFF plugin, does not need a pixel mode Pillow can decode: OpenCV's libtiff decodes more, e.g. float RGB)."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2(fp.read(8))
    fp.seek(ifd.next)
    ifd.load(fp)
    width, height = int(ifd.get(256, 0)), int(ifd.get(257, 0))
    if width <= 0 or height <= 0:
        raise _HeaderError(f"invalid size {width}×{height} in the first IFD")
    return width, height


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP's first chunk (VP8X canvas, VP8L or VP8 frame), or None."""
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _over_limit(fmt: str, width: int, height: int, max_pixels: int) -> str:
    return f"{fmt} is {width}×{height} = {width * height} pixels, over the max_pixels limit of {max_pixels}"


def _reduction(fmt: str, width: int, height: int, jpeg: dict | None, max_pixels: int | None, name: str) -> int:
    """The DCT reduction (1, 2, 4, 8) that makes the decoded image fit ``max_pixels``; refuses the rest."""
    pixels = width * height
    reduction = 1
    if max_pixels is not None and pixels > max_pixels:
        over = _over_limit(fmt, width, height, max_pixels)
        if jpeg is None:
            raise ImageError(name, f"{over} (refused before decoding; only single-scan JPEGs are decoded reduced)")
        if jpeg["scans"] > 1:
            raise ImageError(name, f"{over} (refused before decoding: libjpeg holds every DCT coefficient of a "
                                   "progressive or multi-scan JPEG, as much memory as the full image, at any scale)")
        fits = [d for d in JPEG_REDUCTIONS if math.ceil(width / d) * math.ceil(height / d) <= max_pixels]
        if not fits:
            raise ImageError(name, f"{over} even at 1/{max(JPEG_REDUCTIONS)} scale (refused before decoding)")
        reduction = fits[0]
    if jpeg is not None and jpeg["compressed_bytes"] * JPEG_PIXELS_PER_BYTE < pixels:
        raise ImageError(name, f"JPEG header claims {width}×{height} = {pixels} pixels but only "
                               f"{jpeg['compressed_bytes']} bytes of compressed data follow (under 1 byte per "
                               f"{JPEG_PIXELS_PER_BYTE} pixels): refused as a decompression bomb before decoding")
    return reduction


__all__ = ["ImageInfo", "probe", "sniff_format", "MAX_JPEG_SCANS", "JPEG_PIXELS_PER_BYTE", "JPEG_REDUCTIONS"]

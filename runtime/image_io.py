"""Robust image input: every path, byte string or array becomes uint8 H×W×3 BGR, or one clear error.

:func:`load_image` accepts a file path, the encoded bytes of a file, or a numpy array (with its colour
order stated). Whatever goes wrong, it raises :class:`ImageError` naming the input and the reason, never
a traceback from inside OpenCV or numpy.

What is checked, and when:

* files: missing, a directory, not a regular file, unreadable, empty, or larger than ``max_bytes``;
* the format is sniffed from the first bytes (JPEG, PNG, GIF, BMP, WebP, TIFF, PNM); anything else
  (text with an image extension, HEIC, ...) is refused before any decoder sees it;
* width × height is read from the header (PNG IHDR, JPEG SOFn, GIF screen + first frame, BMP DIB, WebP
  VP8/VP8L/VP8X, TIFF IFD0, PNM) and checked against ``max_pixels`` **before** decoding, so a
  decompression bomb costs microseconds and no memory;
* truncated files are refused: a JPEG without its end-of-image marker after the scan data, a PNG whose
  chunks run past the end of the data, fail their CRC, or lack IEND (OpenCV would otherwise print libpng
  noise, or, for JPEG in some builds, return a half-grey picture);
* decoding uses ``cv2.imdecode(..., IMREAD_UNCHANGED)``; the EXIF orientation (JPEG APP1, PNG eXIf,
  WebP EXIF) is parsed here and applied, because IMREAD_UNCHANGED ignores it (OpenCV's TIFF decoder
  applies the TIFF Orientation tag itself);
* channels and depth are normalised: grayscale → BGR, alpha dropped, 16-bit scaled to 8-bit
  (``round(v / 257)``), CMYK JPEG converted to BGR by OpenCV, animated GIF → first frame.

Arrays follow the same normalisation; floats must lie in [0, 1] or [0, 255] (see :func:`from_array`).
"""
from __future__ import annotations

import contextlib
import os
import stat
import struct
import sys
import threading
import zlib
from typing import Union

import cv2
import numpy as np

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

#: Default pixel limit (width × height) before decoding: 50 megapixels (~150 MB as BGR uint8).
DEFAULT_MAX_PIXELS = 50_000_000
#: Default limit on the size of an encoded file.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: Progressive JPEGs with more scans than this are refused (a CPU-time bomb; libjpeg-turbo's own
#: TurboJPEG API uses 500).
MAX_JPEG_SCANS = 500

COLOR_ORDERS = ("BGR", "RGB")


class ImageError(ValueError):
    """An input could not be turned into an image. ``source`` names the input, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


# --------------------------------------------------------------------------------------------- entry


def load_image(src: ImageSource, color_order: str = "BGR", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               *, name: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Load ``src`` as a uint8 H×W×3 **BGR** array.

    ``src`` is a path, the encoded bytes of an image file, or an array. ``color_order`` ("BGR" or "RGB")
    is the channel order of a 3- or 4-channel *array* input; encoded files carry their own. ``max_pixels``
    (None: no limit) bounds width × height, checked from the header before decoding; ``max_bytes`` bounds
    the encoded size. ``name`` labels byte/array inputs in error messages (e.g. an upload's file name).
    The result may share memory with an array input that is already uint8 BGR and contiguous.
    """
    order = _check_color_order(color_order)
    if isinstance(src, np.ndarray):
        return from_array(src, order, max_pixels=max_pixels, name=name or "<array>")
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(src)
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageError(label, f"{len(data)} bytes is over the {max_bytes}-byte limit")
        return decode_image(data, label, max_pixels=max_pixels)
    if isinstance(src, (str, os.PathLike)):
        data = read_file(src, max_bytes=max_bytes)
        return decode_image(data, name or os.fspath(src), max_pixels=max_pixels)
    if hasattr(src, "__array_interface__") or hasattr(src, "__array__"):  # e.g. a PIL image
        try:
            arr = np.asarray(src)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a bad input
            raise ImageError(name or type(src).__name__, f"cannot convert to an array ({e})") from None
        return from_array(arr, order, max_pixels=max_pixels, name=name or type(src).__name__)
    raise ImageError(name or type(src).__name__,
                     "unsupported input type; pass a path, encoded bytes or a numpy array")


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


# ------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (checked as described in the module docstring) to uint8 H×W×3 BGR."""
    if len(data) == 0:
        raise ImageError(name, "empty (0 bytes)")
    info = probe(data, name)
    fmt, width, height = info["format"], info["width"], info["height"]
    if width <= 0 or height <= 0:
        raise ImageError(name, f"{fmt} header gives an invalid size {width}×{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(name, f"{fmt} is {width}×{height} = {width * height} pixels, over the "
                               f"max_pixels limit of {max_pixels} (refused before decoding)")
    try:
        with _native_messages_muted():
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageError(name, f"cannot decode {fmt} ({_first_line(e)})") from None
    if img is None or img.size == 0:
        raise ImageError(name, f"cannot decode {fmt} data (corrupt, truncated or an unsupported variant)")
    if max_pixels is not None and img.shape[0] * img.shape[1] > max_pixels:  # header lied
        raise ImageError(name, f"decoded {fmt} is {img.shape[1]}×{img.shape[0]}, over the max_pixels limit")
    img = from_array(img, "BGR", max_pixels=None, name=name)
    return apply_orientation(img, info.get("orientation", 1))


_MUTE = {"enabled": False, "depth": 0, "saved_fd": -1, "log_level": None}
_MUTE_LOCK = threading.Lock()


def silence_native_decoder_messages(silent: bool = True) -> None:
    """Opt in (CLI tools) to hiding what libjpeg/libpng/OpenCV print on stderr while decoding corrupt data.

    Decoding problems are reported as :class:`ImageError` anyway; these native lines ("Corrupt JPEG data:
    ...", "libpng error: ...", "[ERROR:0] ... imdecode_") would break a one-line error contract. While any
    decode runs, file descriptor 2 points at /dev/null — process-wide, so other threads' stderr output in
    that window is lost: meant for command-line programs, off by default for library use.
    """
    _MUTE["enabled"] = bool(silent)


@contextlib.contextmanager
def decoder_messages_silenced():
    """``with decoder_messages_silenced(): ...`` — :func:`silence_native_decoder_messages` for a block."""
    previous = _MUTE["enabled"]
    _MUTE["enabled"] = True
    try:
        yield
    finally:
        _MUTE["enabled"] = previous


@contextlib.contextmanager
def _native_messages_muted():
    if not _MUTE["enabled"]:
        yield
        return
    with _MUTE_LOCK:  # reference-counted, so concurrent decodes restore stderr exactly once
        if _MUTE["depth"] == 0:
            try:
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - a closed or odd sys.stderr must not break decoding
                pass
            _MUTE["saved_fd"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            _MUTE["log_level"] = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        _MUTE["depth"] += 1
    try:
        yield
    finally:
        with _MUTE_LOCK:
            _MUTE["depth"] -= 1
            if _MUTE["depth"] == 0:
                os.dup2(_MUTE["saved_fd"], 2)
                os.close(_MUTE["saved_fd"])
                cv2.utils.logging.setLogLevel(_MUTE["log_level"])


def probe(data: bytes, name: str = "<bytes>") -> dict:
    """Format, width, height and EXIF orientation from the header, without decoding pixels.

    Raises :class:`ImageError` for unknown formats and for headers that are truncated or corrupt.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(name, _unknown_format_reason(data))
    try:
        info = _PROBES[fmt](data)
    except _HeaderError as e:
        raise ImageError(name, f"{fmt}: {e}") from None
    except (struct.error, IndexError, ValueError) as e:
        raise ImageError(name, f"{fmt}: corrupt or truncated header ({e})") from None
    info["format"] = fmt
    return info


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
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[1:2] != b"":
        return "PNM"
    return None


def _unknown_format_reason(data: bytes) -> str:
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("latin-1", "replace")
        return f"HEIF/AVIF/MP4 container (brand {brand!r}) is not a supported image format; convert it to JPEG or PNG"
    head = data[:64]
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return "not an image: the file starts with text (supported: JPEG, PNG, GIF, BMP, WebP, TIFF, PNM)"
    return "not a recognised image format (supported: JPEG, PNG, GIF, BMP, WebP, TIFF, PNM)"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class _HeaderError(Exception):
    """A header problem, reported as an ImageError by :func:`probe`."""


# ------------------------------------------------------------------------------------ header probes


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _probe_jpeg(data: bytes) -> dict:
    pos, n = 2, len(data)
    orientation, size = 1, None
    while True:
        while pos < n and data[pos] != 0xFF:  # tolerate junk between segments, as libjpeg does
            pos += 1
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise _HeaderError("truncated before the image data")
        marker = data[pos]
        pos += 1
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise _HeaderError("end-of-image marker before any image data")
        if pos + 2 > n:
            raise _HeaderError("truncated in a segment header")
        seg_len = struct.unpack(">H", data[pos:pos + 2])[0]
        if seg_len < 2 or pos + seg_len > n:
            raise _HeaderError("truncated (a segment runs past the end of the data)")
        seg = data[pos + 2:pos + seg_len]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00" and orientation == 1:
            orientation = _tiff_orientation(seg[6:])
        elif marker in _JPEG_SOF and size is None:
            if len(seg) < 6:
                raise _HeaderError("frame header too short")
            height, width = struct.unpack(">HH", seg[1:5])
            if height == 0:
                raise _HeaderError("height defined by a DNL marker is not supported")
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise _HeaderError("scan data before the frame header")
            scan = data[pos + seg_len:]
            # In entropy-coded data every 0xFF is followed by 0x00 or RSTn, so EOI and SOS markers
            # cannot occur by chance: a missing EOI means the file was cut short.
            if b"\xff\xd9" not in scan:
                raise _HeaderError("truncated: no end-of-image marker after the scan data")
            if scan.count(b"\xff\xda") + 1 > MAX_JPEG_SCANS:
                raise _HeaderError(f"more than {MAX_JPEG_SCANS} progressive scans (refused as a CPU bomb)")
            return {"width": size[0], "height": size[1], "orientation": orientation}
        pos += seg_len


def _probe_png(data: bytes) -> dict:
    n, pos = len(data), 8
    width = height = None
    orientation = 1
    first = True
    while True:
        if pos + 8 > n:
            raise _HeaderError("truncated: data ends before the IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if length > 0x7FFFFFFF or end > n:
            raise _HeaderError(f"truncated: chunk {ctype!r} runs past the end of the data")
        body = data[pos + 8:pos + 8 + length]
        crc = struct.unpack(">I", data[end - 4:end])[0]
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise _HeaderError(f"corrupt: CRC mismatch in chunk {ctype!r}")
        if first:
            if ctype != b"IHDR" or length < 13:
                raise _HeaderError("first chunk is not a valid IHDR")
            width, height = struct.unpack(">II", body[:8])
            first = False
        elif ctype == b"eXIf":
            orientation = _tiff_orientation(body)
        elif ctype == b"IEND":
            return {"width": width, "height": height, "orientation": orientation}
        pos = end


def _probe_gif(data: bytes) -> dict:
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    n = len(data)
    while pos < n:  # walk to the first image descriptor and take the larger of screen and frame
        block = data[pos]
        if block == 0x2C:
            left, top, fw, fh = struct.unpack("<HHHH", data[pos + 1:pos + 9])
            return {"width": max(width, left + fw), "height": max(height, top + fh), "orientation": 1}
        if block == 0x21:  # extension: label, then sub-blocks up to a zero length
            pos += 2
            while pos < n and data[pos] != 0:
                pos += data[pos] + 1
            pos += 1
            continue
        if block == 0x3B:
            raise _HeaderError("no image in the file")
        raise _HeaderError(f"unexpected block 0x{block:02x}")
    raise _HeaderError("truncated before the first image")


def _probe_bmp(data: bytes) -> dict:
    dib = struct.unpack("<I", data[14:18])[0]
    if dib == 12:
        width, height = struct.unpack("<hh", data[18:22])
    elif dib >= 40:
        width, height = struct.unpack("<ii", data[18:26])
    else:
        raise _HeaderError(f"unknown DIB header size {dib}")
    return {"width": abs(width), "height": abs(height), "orientation": 1}


def _probe_webp(data: bytes) -> dict:
    orientation = 1
    kind = data[12:16]
    if kind == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        if data[20] & 0x08:  # EXIF flag: find the EXIF chunk
            pos = 12
            while pos + 8 <= len(data):
                ctype, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
                if ctype == b"EXIF":
                    body = data[pos + 8:pos + 8 + length]
                    orientation = _tiff_orientation(body[6:] if body[:6] == b"Exif\x00\x00" else body)
                    break
                pos += 8 + length + (length & 1)
    elif kind == b"VP8L":
        if data[20] != 0x2F:
            raise _HeaderError("bad VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _HeaderError("bad VP8 start code")
        width, height = struct.unpack("<HH", data[26:30])
        width, height = width & 0x3FFF, height & 0x3FFF
    else:
        raise _HeaderError(f"unknown chunk {kind!r}")
    return {"width": width, "height": height, "orientation": orientation}


def _probe_tiff(data: bytes) -> dict:
    tags = _tiff_ifd0(data, want=(256, 257))
    if 256 not in tags or 257 not in tags:
        raise _HeaderError("no width/height in the first IFD")
    # OpenCV's TIFF decoder applies the Orientation tag itself, even with IMREAD_UNCHANGED
    return {"width": tags[256], "height": tags[257], "orientation": 1}


def _probe_pnm(data: bytes) -> dict:
    tokens: list[int] = []
    pos, n = 2, min(len(data), 4096)
    while len(tokens) < 2 and pos < n:
        c = data[pos:pos + 1]
        if c == b"#":
            while pos < n and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
        elif c.isdigit():
            start = pos
            while pos < n and data[pos:pos + 1].isdigit():
                pos += 1
            tokens.append(int(data[start:pos]))
            continue
        elif not c.isspace():
            raise _HeaderError("malformed header")
        pos += 1
    if len(tokens) < 2:
        raise _HeaderError("truncated header")
    return {"width": tokens[0], "height": tokens[1], "orientation": 1}


_PROBES = {"JPEG": _probe_jpeg, "PNG": _probe_png, "GIF": _probe_gif, "BMP": _probe_bmp,
           "WebP": _probe_webp, "TIFF": _probe_tiff, "PNM": _probe_pnm}


def _tiff_ifd0(tiff: bytes, want: tuple[int, ...]) -> dict[int, int]:
    """SHORT/LONG values of the wanted tags in the first IFD of a TIFF structure (also EXIF)."""
    if tiff[:2] == b"II":
        e = "<"
    elif tiff[:2] == b"MM":
        e = ">"
    else:
        raise _HeaderError("bad TIFF byte order")
    if struct.unpack(e + "H", tiff[2:4])[0] != 42:
        raise _HeaderError("bad TIFF magic")
    off = struct.unpack(e + "I", tiff[4:8])[0]
    count = struct.unpack(e + "H", tiff[off:off + 2])[0]
    out: dict[int, int] = {}
    for i in range(count):
        entry = tiff[off + 2 + 12 * i:off + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, typ, _cnt = struct.unpack(e + "HHI", entry[:8])
        if tag in want:
            if typ == 3:
                out[tag] = struct.unpack(e + "H", entry[8:10])[0]
            elif typ == 4:
                out[tag] = struct.unpack(e + "I", entry[8:12])[0]
    return out


def _tiff_orientation(tiff: bytes) -> int:
    """The EXIF orientation (1..8) in a TIFF-structured EXIF block; 1 when absent or unreadable."""
    try:
        value = _tiff_ifd0(tiff, want=(0x0112,)).get(0x0112, 1)
    except (_HeaderError, struct.error, IndexError, ValueError):
        return 1  # a broken EXIF block is not worth refusing the picture for
    return value if 1 <= value <= 8 else 1


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


# ----------------------------------------------------------------------------------------- arrays


def from_array(arr: np.ndarray, color_order: str = "BGR", max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str = "<array>") -> np.ndarray:
    """Normalise an image array to uint8 H×W×3 BGR.

    Shapes: H×W or H×W×1 (grayscale), H×W×3 (``color_order``), H×W×4 (alpha dropped). Depths: uint8;
    bool; uint16 scaled to 8 bits (``round(v / 257)``, i.e. 16-bit full scale even if the values are
    small); other integers must lie in 0..255; floats must be finite and lie in [0, 1] (scaled by 255)
    or in [0, 255] — an array whose maximum is ≤ 1 is read as [0, 1].
    """
    order = _check_color_order(color_order)
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


def _check_color_order(color_order: str) -> str:
    order = str(color_order).upper()
    if order in ("BGRA", "RGBA"):
        order = order[:3]
    if order not in COLOR_ORDERS:
        raise ValueError(f"color_order must be 'BGR' or 'RGB', got {color_order!r}")
    return order


# ------------------------------------------------------------------------------------------- sizes


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


__all__ = ["ImageError", "load_image", "decode_image", "read_file", "probe", "sniff_format", "from_array",
           "apply_orientation", "downscale_for_detection", "silence_native_decoder_messages",
           "decoder_messages_silenced", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES"]

"""A generated corpus of bad and awkward image files, shared by test_image_io and test_robustness.

``write_corpus(folder)`` writes every file and returns name → path. ``BAD_INPUTS`` maps the names that
must give an ImageError to a word the (lower-cased) message must contain; ``GOOD_INPUTS`` maps the names
that must load to their (height, width) after EXIF orientation. Needs Pillow (CMYK, animated GIF, EXIF).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

BAD_INPUTS: dict[str, str] = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "not an image",
    "text.png": "not an image",
    "bomb_100k.png": "max_pixels",
    "bomb.jpg": "max_pixels",
    "bomb.gif": "max_pixels",
    "bomb.bmp": "max_pixels",
    "bomb.webp": "max_pixels",
    "zero_size.png": "invalid size",
    "heic_photo.jpg": "heif",
    "binary_junk.jpg": "not a recognised image format",
    "folder.jpg": "directory",
}

GOOD_INPUTS: dict[str, tuple[int, int]] = {
    "gray16.png": (48, 64),
    "rgb16.png": (48, 64),
    "cmyk.jpg": (48, 64),
    "one_pixel.png": (1, 1),
    "one_pixel.jpg": (1, 1),
    "one_pixel.gif": (1, 1),
    "gray.png": (48, 64),
    "gray.jpg": (48, 64),
    "rgba.png": (48, 64),
    "palette.png": (48, 64),
    "animated.gif": (20, 30),
    "exif_rotated.jpg": (64, 48),  # stored 48×64 (h×w) with orientation 6: displayed 64 high
    "plain.bmp": (48, 64),
    "plain.webp": (48, 64),
    "plain.tif": (48, 64),
    "trailing_junk.jpg": (48, 64),
}


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR claims ``width``×``height`` but carries only a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + png_chunk(b"IEND", b""))


def _pil_bytes(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def sample_bgr(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colourful test picture (compresses well, survives JPEG)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy + seed * 37) % 256], -1)
    return img.astype(np.uint8)


def corpus_bytes() -> dict[str, bytes]:
    """Name → file content for every file of the corpus (the directory case excluded)."""
    from PIL import Image

    bgr = sample_bgr()
    rgb = bgr[..., ::-1].copy()
    jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
    png = cv2.imencode(".png", bgr)[1].tobytes()
    out: dict[str, bytes] = {}
    out["empty.jpg"] = b""
    out["truncated.jpg"] = jpg[: len(jpg) * 2 // 3]
    out["truncated.png"] = png[: len(png) // 2]
    out["text.jpg"] = b"This is not a picture, just a note that was renamed.\n" * 3
    out["text.png"] = b"<html><body>404 Not Found</body></html>\n"
    out["bomb_100k.png"] = png_header_only(100_000, 100_000)
    sof = jpg.index(b"\xff\xc0")
    out["bomb.jpg"] = jpg[: sof + 5] + struct.pack(">HH", 65000, 65000) + jpg[sof + 9:]
    out["bomb.gif"] = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + \
        b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b"
    out["bomb.bmp"] = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0, 0, 0, 0]) + (16383).to_bytes(3, "little") * 2
    out["bomb.webp"] = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    out["zero_size.png"] = png_header_only(0, 0)
    out["heic_photo.jpg"] = struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + bytes(range(200))
    out["binary_junk.jpg"] = bytes(np.random.default_rng(3).integers(0, 256, 1000, np.uint8).tolist()).replace(b"\xff", b"\x00")

    g16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    out["gray16.png"] = cv2.imencode(".png", g16)[1].tobytes()
    c16 = np.zeros((48, 64, 3), np.uint16)
    c16[...] = (65535, 32896, 0)  # BGR order for OpenCV: RGB (0, 32896, 65535)
    out["rgb16.png"] = cv2.imencode(".png", c16)[1].tobytes()
    out["cmyk.jpg"] = _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    out["one_pixel.png"] = cv2.imencode(".png", bgr[:1, :1])[1].tobytes()
    out["one_pixel.jpg"] = cv2.imencode(".jpg", bgr[:1, :1])[1].tobytes()
    out["one_pixel.gif"] = _pil_bytes(Image.fromarray(rgb[:1, :1]), "GIF")
    out["gray.png"] = cv2.imencode(".png", bgr[..., 1])[1].tobytes()
    out["gray.jpg"] = cv2.imencode(".jpg", bgr[..., 1])[1].tobytes()
    rgba = np.dstack([np.full((48, 64, 3), (10, 20, 30), np.uint8), np.zeros((48, 64), np.uint8)])
    out["rgba.png"] = _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    out["palette.png"] = _pil_bytes(Image.fromarray(rgb).convert("P"), "PNG")
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200)]
    out["animated.gif"] = _pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif_rotated.jpg"] = _pil_bytes(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    out["plain.bmp"] = cv2.imencode(".bmp", bgr)[1].tobytes()
    out["plain.webp"] = cv2.imencode(".webp", bgr)[1].tobytes()
    out["plain.tif"] = cv2.imencode(".tif", bgr)[1].tobytes()
    out["trailing_junk.jpg"] = jpg + b"\x00garbage after the end-of-image marker"
    return out


def corrupt_but_well_framed() -> dict[str, bytes]:
    """Files that pass every header check but whose compressed data is broken (the decoder sees them)."""
    img = sample_bgr()
    jpg = bytearray(cv2.imencode(".jpg", img)[1].tobytes())
    sos = jpg.index(b"\xff\xda")
    for i in range(sos + 20, len(jpg) - 10, 7):
        if jpg[i] != 0xFF and jpg[i - 1] != 0xFF:
            jpg[i] = 0xFF if i % 2 else 0x00  # marker-like junk inside the scan data
    png = cv2.imencode(".png", img)[1].tobytes()
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    body = bytes(b ^ 0x5A for b in png[idat + 4:idat + 4 + length])
    bad_png = png[:idat - 4] + png_chunk(b"IDAT", body) + png[idat + 8 + length:]
    return {"jpeg": bytes(jpg), "png": bad_png}


def write_corpus(folder: Path) -> dict[str, Path]:
    """Write the corpus into ``folder`` (plus a directory named like an image); return name → path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, data in corpus_bytes().items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    paths["folder.jpg"] = folder / "folder.jpg"
    paths["folder.jpg"].mkdir(exist_ok=True)
    missing = (set(BAD_INPUTS) | set(GOOD_INPUTS)) - set(paths)
    assert not missing, missing
    return paths

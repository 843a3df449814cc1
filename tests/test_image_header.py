"""runtime.image_header: header probing on Pillow without its process-wide limits, and the checks added on top."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest

from runtime.image_io import ImageError, load_image, probe

PIL = pytest.importorskip("PIL", reason="Pillow is the header reader under test")
from PIL import Image  # noqa: E402

from image_corpus import BAD_INPUTS, GOOD_INPUTS, corpus_bytes, png_header_only  # noqa: E402
from threads import run_threads  # noqa: E402


def test_pillow_global_pixel_limit_is_neither_relied_on_nor_changed(monkeypatch):
    small = cv2.imencode(".jpg", np.zeros((200, 300, 3), np.uint8))[1].tobytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a host app's strict setting
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(small))  # Pillow's own open refuses 60 000 pixels now...
    assert load_image(small).shape == (200, 300, 3)  # ...facekit applies its own max_pixels instead
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a host app that switched Pillow's check off
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(png_header_only(100_000, 100_000))
    assert Image.MAX_IMAGE_PIXELS is None


def test_webp_under_a_strict_host_limit_names_pillows_setting(monkeypatch):
    """Pillow's WebP plugin checks Image.MAX_IMAGE_PIXELS itself while opening: reported as such."""
    webp = cv2.imencode(".webp", np.zeros((100, 100, 3), np.uint8))[1].tobytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        load_image(webp)


def test_an_eoi_inside_exif_does_not_hide_a_truncated_jpeg():
    thumb = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()  # has its own SOS and EOI
    body = b"Exif\x00\x00" + thumb
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    main = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
    data = main[:2] + app1 + main[2:]
    assert load_image(data).shape == (64, 64, 3)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[:-300])


def test_png_iend_crc_is_checked():
    data = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    data[-1] ^= 1
    with pytest.raises(ImageError, match="CRC"):
        load_image(bytes(data))


@pytest.mark.parametrize("dtype, channels", [(np.float32, 3), (np.float64, 1), (np.uint16, 4)])
def test_tiffs_pillow_cannot_decode_still_load(dtype, channels):
    """TIFF sizes come from Pillow's tag reader, so OpenCV's libtiff decodes what Pillow's plugin cannot."""
    arr = np.random.default_rng(1).random((20, 30, channels)).astype(dtype)
    if dtype == np.uint16:
        arr = (arr * 65535).astype(np.uint16)
    data = cv2.imencode(".tif", arr)[1].tobytes()
    assert probe(data).width == 30 and probe(data).height == 20
    assert load_image(data).shape == (20, 30, 3)


def test_probe_reads_without_decoding():
    info = probe(png_header_only(100_000, 100_000))
    assert (info.format, info.width, info.height, info.reduction) == ("PNG", 100_000, 100_000, 1)
    with pytest.raises(ImageError, match="max_pixels"):
        probe(png_header_only(100_000, 100_000), max_pixels=50_000_000)


def test_eight_threads_probe_and_decode_like_one():
    files = corpus_bytes()
    names = sorted(n for n in files if n in BAD_INPUTS or n in GOOD_INPUTS)

    def outcome(name: str):
        try:
            return load_image(files[name], name=name).tobytes()
        except ImageError as e:
            return str(e)

    expected = {n: outcome(n) for n in names}
    results: list[dict] = [dict() for _ in range(8)]

    def work(i: int) -> None:
        for _ in range(5):
            for n in names[i % len(names):] + names[:i % len(names)]:
                results[i][n] = outcome(n)

    run_threads(work, 8)
    assert all(r == expected for r in results)

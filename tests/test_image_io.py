"""runtime.image_io: a generated bad-input corpus, array normalisation, EXIF orientation and a fuzz test.

Every input gives either a uint8 H×W×3 image or one ImageError naming the input and the reason.
"""
from __future__ import annotations

import io
import os
import resource
import struct
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.image_io import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode_image,
    downscale_for_detection,
    from_array,
    load_image,
    probe,
)

PIL = pytest.importorskip("PIL", reason="Pillow writes the CMYK, animated GIF and EXIF test files")
from PIL import Image, ImageOps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_corpus import BAD_INPUTS, GOOD_INPUTS, corrupt_but_well_framed, png_chunk, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _is_image(img) -> bool:
    return isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 \
        and img.shape[0] > 0 and img.shape[1] > 0 and img.flags.c_contiguous


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_file_gives_one_clear_error(corpus, case):
    path = corpus[case]
    with pytest.raises(ImageError) as err:
        load_image(path)
    msg = str(err.value)
    assert str(path) in msg, msg  # names the file
    assert BAD_INPUTS[case] in msg.lower(), msg  # and the reason
    assert "\n" not in msg and "Traceback" not in msg
    assert err.value.__cause__ is None or isinstance(err.value.__cause__, ImageError)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_bytes_name_the_upload(corpus, case):
    path = corpus[case]
    if not path.is_file():
        pytest.skip("not a file")
    with pytest.raises(ImageError, match="upload.bin"):
        load_image(path.read_bytes(), name="upload.bin")


@pytest.mark.parametrize("case", sorted(GOOD_INPUTS))
def test_odd_but_valid_file_gives_an_image(corpus, case):
    img = load_image(corpus[case])
    assert _is_image(img)
    assert img.shape[:2] == GOOD_INPUTS[case]


def test_missing_file_and_unreadable_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    locked = tmp_path / "locked.png"
    locked.write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ImageError, match="cannot read"):
            load_image(str(locked))
    finally:
        locked.chmod(0o600)


def test_decompression_bombs_fail_fast_with_bounded_memory(corpus):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for case in ("bomb_100k.png", "bomb.jpg", "bomb.gif", "bomb.bmp", "bomb.webp"):
        data = corpus[case].read_bytes()
        assert len(data) < 10_000
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match="max_pixels"):
            load_image(corpus[case])
        assert time.perf_counter() - t0 < 0.5, case
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    # the header is what is checked: the same limit lets a small image through and refuses one pixel more
    small = cv2.imencode(".png", np.zeros((10, 20, 3), np.uint8))[1].tobytes()
    assert load_image(small, max_pixels=200).shape == (10, 20, 3)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(small, max_pixels=199)
    assert DEFAULT_MAX_PIXELS >= 24_000_000  # a modern phone photo passes


def test_truncated_jpeg_is_refused_at_any_cut():
    rng = np.random.default_rng(0)
    data = cv2.imencode(".jpg", rng.integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()
    sos = data.index(b"\xff\xda")
    for cut in (2, 50, len(data) // 2, sos + 10, len(data) - 1, len(data) - 2):
        with pytest.raises(ImageError, match="truncated"):
            load_image(data[:cut])
    assert _is_image(load_image(data + b"trailing junk"))  # bytes after EOI are harmless


def test_truncated_png_is_refused_before_libpng_sees_it():
    data = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    for cut in (9, 20, 33, len(data) // 2, len(data) - 1, len(data) - 12):
        with pytest.raises(ImageError, match="truncated|IHDR"):
            probe(data[:cut])


def test_corrupt_png_crc_is_refused():
    data = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    data[40] ^= 0x55  # inside the IDAT body
    with pytest.raises(ImageError, match="CRC"):
        load_image(bytes(data))


# ---------------------------------------------------------------------------------- decoded content


def test_sixteen_bit_png_is_scaled_to_eight_bits(corpus):
    img = load_image(corpus["gray16.png"])
    raw = cv2.imread(str(corpus["gray16.png"]), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    expected = np.rint(raw / 257.0).astype(np.uint8)
    assert np.abs(img[..., 0].astype(int) - expected).max() <= 1
    assert (img[..., 0] == img[..., 2]).all()
    rgb16 = load_image(corpus["rgb16.png"])
    assert rgb16[0, 0].tolist() == [255, 128, 0]  # BGR of RGB (0, 32896, 65535)


def test_grayscale_rgba_and_gif_content(corpus):
    gray = load_image(corpus["gray.png"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgba = load_image(corpus["rgba.png"])
    assert rgba[0, 0].tolist() == [30, 20, 10]  # RGB (10, 20, 30) with alpha 0: alpha dropped, colour kept
    gif = load_image(corpus["animated.gif"])
    assert abs(int(gif[0, 0, 0]) - 10) <= 2  # the first frame (10), not the second (200)


def test_cmyk_jpeg_matches_pillow(corpus):
    img = load_image(corpus["cmyk.jpg"])
    ref = np.asarray(Image.open(corpus["cmyk.jpg"]).convert("RGB"))[..., ::-1]
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(fmt, orientation):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:10, :20] = (255, 0, 0)
    rgb[30:, 50:] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))[..., ::-1]
    got = load_image(data)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 8


def test_corrupt_exif_is_ignored_not_fatal():
    data = cv2.imencode(".jpg", np.full((8, 12, 3), 100, np.uint8))[1].tobytes()
    bad_app1 = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff"  # IFD offset far past the end
    seg = b"\xff\xe1" + struct.pack(">H", len(bad_app1) + 2) + bad_app1
    img = load_image(data[:2] + seg + data[2:])
    assert img.shape == (8, 12, 3)


# ------------------------------------------------------------------------------------------ arrays


def test_arrays_of_every_layout_and_depth():
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200  # red
    bgr = load_image(rgb, color_order="RGB")
    assert bgr[0, 0].tolist() == [0, 0, 200]
    assert load_image(rgb, color_order="BGR")[0, 0].tolist() == [200, 0, 0]
    assert load_image(np.dstack([rgb, np.zeros((5, 7), np.uint8)]), color_order="RGB")[0, 0].tolist() == [0, 0, 200]
    assert load_image(np.full((5, 7), 9, np.uint8))[2, 3].tolist() == [9, 9, 9]
    assert load_image(np.full((5, 7, 1), 9, np.uint8)).shape == (5, 7, 3)
    assert load_image(np.full((5, 7), 65535, np.uint16))[0, 0, 0] == 255
    assert load_image(np.full((5, 7), 1.0, np.float32))[0, 0, 0] == 255  # [0, 1] floats
    assert load_image(np.full((5, 7), 0.5, np.float64))[0, 0, 0] == 128
    assert load_image(np.full((5, 7), 200.0, np.float32))[0, 0, 0] == 200  # [0, 255] floats
    assert load_image(np.full((5, 7), 77, np.int64))[0, 0, 0] == 77
    assert load_image(np.ones((5, 7), bool))[0, 0, 0] == 255
    view = np.zeros((10, 14, 3), np.uint8)[::2, ::2]  # non-contiguous
    assert load_image(view).flags.c_contiguous
    assert load_image(Image.fromarray(rgb), color_order="RGB")[0, 0].tolist() == [0, 0, 200]


@pytest.mark.parametrize("arr, reason", [
    (np.zeros((0, 5, 3), np.uint8), "no pixels"),
    (np.zeros((4, 5, 2), np.uint8), "not an image"),
    (np.zeros((2, 4, 5, 3), np.uint8), "not an image"),
    (np.zeros(7, np.uint8), "not an image"),
    (np.full((4, 4), np.nan, np.float32), "nan"),
    (np.full((4, 4), -0.5, np.float32), "float values"),
    (np.full((4, 4), 300.0, np.float32), "float values"),
    (np.full((4, 4), 300, np.int32), "values span"),
    (np.zeros((4, 4), np.complex64), "dtype"),
])
def test_bad_arrays_are_refused(arr, reason):
    with pytest.raises(ImageError, match="<array>") as err:
        load_image(arr)
    assert reason in str(err.value).lower()


def test_bad_arguments():
    with pytest.raises(ValueError, match="color_order"):
        load_image(np.zeros((2, 2, 3), np.uint8), color_order="XYZ")
    with pytest.raises(ImageError, match="unsupported input type"):
        load_image(12345)
    with pytest.raises(ImageError, match="max_pixels"):
        from_array(np.zeros((100, 100), np.uint8), max_pixels=9999)


def test_downscale_for_detection_maps_coordinates_back():
    img = np.zeros((1000, 3000, 3), np.uint8)
    img[500:510, 1500:1510] = 255
    small, scale = downscale_for_detection(img, 640)
    assert max(small.shape[:2]) == 640 and scale == pytest.approx(640 / 3000)
    ys, xs = np.nonzero(small[..., 0] > 100)
    assert abs(xs.mean() / scale - 1505) < 3 and abs(ys.mean() / scale - 505) < 3
    same, s1 = downscale_for_detection(img[:100, :200], 640)
    assert s1 == 1.0 and same.shape == (100, 200, 3)
    thin, _ = downscale_for_detection(np.zeros((2, 5000, 3), np.uint8), 100)
    assert thin.shape[0] >= 1 and thin.shape[1] == 100
    with pytest.raises(ValueError):
        downscale_for_detection(img, 0)


# ----------------------------------------------------------------------------------- corrupt data


def test_corrupt_data_gives_an_image_or_an_error_and_can_be_silenced(capfd):
    from runtime import image_io

    for kind, data in corrupt_but_well_framed().items():
        for silent in (False, True):
            image_io.silence_native_decoder_messages(silent)
            try:
                try:
                    assert _is_image(load_image(data, name=f"corrupt.{kind}"))
                except ImageError as e:
                    assert f"corrupt.{kind}" in str(e)
                sys.stderr.write("after\n")
            finally:
                image_io.silence_native_decoder_messages(False)
            err = capfd.readouterr().err
            assert err.endswith("after\n"), "stderr was not restored"
            if silent:
                assert err == "after\n", f"native messages leaked: {err!r}"


# -------------------------------------------------------------------------------------------- fuzz

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    st = None

_RNG = np.random.default_rng(1)
_BASE = _RNG.integers(0, 255, (24, 32, 3), np.uint8)
SEEDS = [
    cv2.imencode(".jpg", _BASE)[1].tobytes(),
    cv2.imencode(".jpg", _BASE, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    cv2.imencode(".png", _BASE)[1].tobytes(),
    cv2.imencode(".png", _BASE[..., 0])[1].tobytes(),
    cv2.imencode(".gif", _BASE)[1].tobytes(),
    cv2.imencode(".bmp", _BASE)[1].tobytes(),
    cv2.imencode(".webp", _BASE)[1].tobytes(),
]
FUZZ_MAX_PIXELS = 4_000_000  # bounds the time a mutated header can ask the decoder to spend


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC so that mutations reach libpng instead of stopping at our CRC check."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        if pos + 12 + length > len(data):
            break
        out += png_chunk(data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return bytes(out + data[pos:])


def _assert_image_or_image_error(data: bytes) -> None:
    try:
        img = decode_image(data, "<fuzz>", max_pixels=FUZZ_MAX_PIXELS)
    except ImageError as e:
        assert str(e).startswith("<fuzz>: ")
        return
    assert _is_image(img)


if st is None:
    def test_fuzz():
        pytest.skip("hypothesis is not installed")
else:
    @st.composite
    def mutated_image(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(SEEDS)))
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set" and data:
                data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
            elif op == "cut":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[pos:pos + draw(st.integers(1, 16))]
        data = bytes(data)
        return _fix_png_crcs(data) if draw(st.booleans()) else data


    _FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


    @_FUZZ
    @given(st.one_of(
        st.binary(max_size=512),
        st.tuples(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP",
                                   b"II*\x00", b"MM\x00*", b"P6"]), st.binary(max_size=256)).map(b"".join),
    ))
    def test_fuzz_random_bytes(data):
        _assert_image_or_image_error(data)


    @_FUZZ
    @given(mutated_image())
    def test_fuzz_mutated_images(data):
        _assert_image_or_image_error(data)

"""Large photos: JPEGs over max_pixels are decoded at 1/2, 1/4 or 1/8 scale, faces come back in the
file's pixels, memory stays bounded, and forged headers (decompression bombs) are still refused."""
from __future__ import annotations

import io
import math
import resource
import struct
import time
import warnings

import cv2
import numpy as np
import pytest

from benchmarks.large_photos import SOURCE_FACES, forged_jpeg_header, make_large_jpeg, measure_pipeline
from conftest import need
from runtime.cli import main as cli_main
from runtime.image_io import DEFAULT_MAX_PIXELS, ImageError, LoadedImage, load_image, load_image_scaled
from runtime.pipeline import DEFAULT_RECOGNIZER, FacePipeline

PIL = pytest.importorskip("PIL", reason="Pillow writes the EXIF-rotated and progressive test JPEGs")
from PIL import Image  # noqa: E402

SIZES_MP = (54, 108)


@pytest.fixture(scope="session")
def group_photo(facekit_data):
    return need(facekit_data / "photos" / "group_t1.jpg")


@pytest.fixture(scope="session")
def big_jpegs(group_photo, tmp_path_factory) -> dict[int, tuple]:
    """54 MP and 108 MP baseline JPEGs made from the 6-face group photo: mp → (path, width, height)."""
    folder = tmp_path_factory.mktemp("large_photos")
    out = {}
    for mp in SIZES_MP:
        path = folder / f"group_{mp}mp.jpg"
        out[mp] = (path, *make_large_jpeg(group_photo, mp, path))
    return out


@pytest.fixture(scope="module")
def pipe():
    need(DEFAULT_RECOGNIZER)
    return FacePipeline()


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _picture(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 80)], -1).astype(np.uint8)
    rgb[h // 8:h // 4, w // 8:w // 4] = (255, 255, 255)  # a white patch near the top-left corner
    return rgb


# ------------------------------------------------------------------------------------- small JPEGs


def test_least_reduction_that_fits_is_chosen():
    data = _jpeg(_picture(300, 400))
    assert load_image_scaled(data).scale == 1.0
    for max_pixels, scale in ((400 * 300, 1.0), (200 * 150, 0.5), (200 * 150 - 1, 0.25), (100 * 75 - 1, 0.125)):
        got = load_image_scaled(data, max_pixels=max_pixels)
        assert got.scale == scale, max_pixels
        assert got.size == (400, 300)
        assert got.image.shape == (math.ceil(300 * scale), math.ceil(400 * scale), 3)
        assert got.image.shape[0] * got.image.shape[1] <= max_pixels
    with pytest.raises(ImageError, match="max_pixels.*even at 1/8 scale"):
        load_image_scaled(data, max_pixels=50 * 38 - 1)
    assert load_image(data, max_pixels=200 * 150).shape == (150, 200, 3)  # load_image: the same pixels


def test_reduced_decode_shows_the_same_picture_upright():
    rgb = _picture(300, 400)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: 300 wide, 400 high
    data = _jpeg(rgb, exif=exif.tobytes())
    full = load_image_scaled(data)
    half = load_image_scaled(data, max_pixels=200 * 150)
    assert full.image.shape == (400, 300, 3) and full.size == (300, 400)
    assert half.scale == 0.5 and half.size == (300, 400) and half.image.shape == (200, 150, 3)
    expected = cv2.resize(full.image, (150, 200), interpolation=cv2.INTER_AREA)
    assert np.abs(half.image.astype(int) - expected.astype(int)).mean() < 3
    ys, xs = np.nonzero(half.image.min(axis=2) > 240)  # the white patch, now near the top-right corner
    assert xs.mean() / half.scale > 200 and ys.mean() / half.scale < 120


def test_only_single_scan_jpegs_are_decoded_reduced():
    rgb = _picture(300, 400)
    progressive = _jpeg(rgb, progressive=True)
    assert load_image(progressive).shape == (300, 400, 3)  # under the limit: decoded as always
    with pytest.raises(ImageError, match="max_pixels.*progressive"):
        load_image(progressive, max_pixels=200 * 150)
    png = cv2.imencode(".png", rgb)[1].tobytes()
    with pytest.raises(ImageError, match="max_pixels.*refused before decoding"):
        load_image(png, max_pixels=200 * 150)
    with pytest.raises(ImageError, match="max_pixels"):  # arrays are never shrunk behind the caller's back
        load_image(rgb, color_order="RGB", max_pixels=200 * 150)


@pytest.mark.parametrize("width, height, max_pixels", [
    (20000, 20000, DEFAULT_MAX_PIXELS),  # would fit at 1/4
    (9000, 6000, DEFAULT_MAX_PIXELS),    # a plausible phone size, would fit at 1/2
    (65000, 65000, None),                # no pixel limit at all
    (2000, 2000, DEFAULT_MAX_PIXELS),    # under the limit: still no data behind the claim
])
def test_forged_jpeg_headers_are_refused_fast_without_memory(width, height, max_pixels):
    data = forged_jpeg_header(width, height)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=max_pixels, name="forged.jpg")
    assert time.perf_counter() - t0 < 0.5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 64


def test_jpeg_with_enough_data_for_its_size_is_not_a_bomb():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)  # ~6 bits per pixel
    assert load_image(_jpeg(noise)).shape == (64, 64, 3)
    flat = np.full((512, 512, 3), 128, np.uint8)  # about as compressible as a JPEG gets
    assert load_image(cv2.imencode(".jpg", flat)[1].tobytes()).shape == (512, 512, 3)


# ---------------------------------------------------------------------------------------- pipeline


def test_pipeline_reports_the_files_coordinates_for_a_reduced_decode(pipe, group_photo):
    reduced = load_image_scaled(group_photo, max_pixels=200_000)  # 1024×709 decoded at 1/2
    assert reduced.scale == 0.5
    faces = pipe.embed(reduced)
    on_pixels = pipe.embed(reduced.image)  # the same pixels as a plain array: coordinates of the 512-wide image
    assert len(faces) == len(on_pixels) == SOURCE_FACES
    for f, g in zip(faces, on_pixels):
        np.testing.assert_allclose(f.box, g.box / 0.5, rtol=1e-6)
        np.testing.assert_allclose(f.landmarks, g.landmarks / 0.5, rtol=1e-6)
        np.testing.assert_array_equal(f.embedding, g.embedding)  # warped from the reduced pixels
        np.testing.assert_array_equal(pipe.align(reduced, f.landmarks), pipe.align(reduced.image, g.landmarks))
    found, on_array = pipe.find_subject(reduced), pipe.find_subject(reduced.image)
    assert found.scale == 0.5 and found.image is reduced.image
    np.testing.assert_allclose(found.face.landmarks * found.scale, on_array.face.landmarks, rtol=1e-6)
    np.testing.assert_array_equal(pipe.subject_face(reduced).embedding, pipe.subject_face(reduced.image).embedding)
    full = pipe.embed(group_photo)  # and they are the faces of the 1024-wide file, where the file has them
    for f in faces:
        ref = min(full, key=lambda g: np.abs(g.box - f.box).sum())
        tol = 0.15 * (ref.box[2] - ref.box[0])  # detector noise between a 512- and a 640-wide input
        assert np.abs(ref.box - f.box).max() < tol and np.abs(ref.landmarks - f.landmarks).max() < tol
        assert float(ref.embedding @ f.embedding) > 0.95


@pytest.mark.slow
def test_large_photos_in_bounded_memory(big_jpegs, group_photo, pipe):
    """Real 54 MP and 108 MP JPEGs: all 6 faces, at the photo's coordinates, peak RSS ≤ 1 GiB (a fresh process)."""
    reference = measure_pipeline(group_photo, group_photo, repeats=1, full=False)
    assert reference["faces"] == SOURCE_FACES
    ref_boxes = np.array(reference["boxes"])
    for mp, (path, width, height) in big_jpegs.items():
        got = measure_pipeline(path, group_photo, repeats=1, full=False)
        assert got["faces"] == SOURCE_FACES, mp
        assert got["peak_rss_mib"] <= 1024, f"{mp} MP: peak RSS {got['peak_rss_mib']} MiB"
        k = width / 1024
        for box in np.array(got["boxes"]):
            assert np.abs(ref_boxes - box / k).sum(axis=1).min() < 12, (mp, box)  # same face, photo pixels


@pytest.mark.slow
def test_large_photo_api_and_cli(big_jpegs, group_photo, pipe, capsys, tmp_path):
    path, width, height = big_jpegs[108]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning (89 MP) must not fire for facekit
        loaded = load_image_scaled(path)
    assert isinstance(loaded, LoadedImage) and loaded.scale == 0.5 and loaded.size == (width, height)
    assert loaded.image.shape == (math.ceil(height / 2), math.ceil(width / 2), 3)
    assert load_image_scaled(path, max_pixels=2_000_000).scale == 0.125
    small = cv2.resize(loaded.image, (1024, 709), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - cv2.imread(str(group_photo)).astype(int)).mean() < 8

    path54, width54, _ = big_jpegs[54]
    reference = {tuple(f.box.round()): f for f in pipe.embed(group_photo)}
    k = width54 / 1024
    for f in pipe.embed(path54):
        ref = min(reference.values(), key=lambda g: np.abs(g.box * k - f.box).sum())
        assert float(ref.embedding @ f.embedding) > 0.98  # the crop comes from the 1/2-scale decode

    out = tmp_path / "annotated.jpg"
    assert cli_main(["detect", str(path54), "--json", "--out", str(out)]) == 0
    import json

    boxes = np.array([f["box"] for f in json.loads(capsys.readouterr().out)])
    assert len(boxes) == SOURCE_FACES and boxes[:, 2].max() > 0.7 * width54  # the photo's pixels
    assert cv2.imread(str(out)).shape[1] == math.ceil(width54 / 2)  # annotated at the decoded size


def test_sof_patch_helper_really_claims_the_size():
    data = forged_jpeg_header(12345, 2345)
    sof = data.index(b"\xff\xc0")
    assert struct.unpack(">HH", data[sof + 5:sof + 9]) == (2345, 12345)

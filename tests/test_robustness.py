"""Reliability end to end: the bad-image corpus through FacePipeline and the CLI, bad recognizer files,
and one pipeline shared by 8 threads (same embeddings as one thread, bounded memory).

The thread test uses FACEKIT_STRESS_IMAGES images (default 200 to stay quick on 2 CPU cores; the
reliability issue's figure is 2000: ``FACEKIT_STRESS_IMAGES=2000 pytest tests/test_robustness.py -s``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, need
from benchmarks.memory import status_mib
from image_corpus import BAD_INPUTS, GOOD_INPUTS, corrupt_but_well_framed, write_corpus
from runtime.backends.base import ModelLoadError
from runtime.cli import main
from runtime.image_io import ImageError
from runtime.metadata import ModelMetadataError
from runtime.pipeline import FacePipeline, NoFaceError
from test_pipeline import make_recognizer
from threads import run_threads

pytest.importorskip("PIL", reason="Pillow writes the CMYK, animated GIF and EXIF corpus files")

STRESS_IMAGES = int(os.environ.get("FACEKIT_STRESS_IMAGES", "200"))
PORTRAITS = ("obama.jpg", "obama2.jpg", "biden.jpg", "angelina_jolie.jpg", "kate_siegel.jpg", "paul_rudd.jpg",
             "shea_whigham.jpg")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory) -> Path:
    return make_recognizer(tmp_path_factory.mktemp("models") / "tiny.onnx", threshold=0.5)


@pytest.fixture(scope="module")
def pipe(recognizer) -> FacePipeline:
    return FacePipeline(recognizer=str(recognizer))


def _one_clear_line(err: str, *must_contain: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for s in must_contain:
        assert s in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------- pipeline, corpus


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_through_the_pipeline(pipe, corpus, case):
    path = str(corpus[case])
    for call in (pipe.detect, pipe.embed, lambda p: pipe.compare(p, p)):
        with pytest.raises(ImageError) as err:
            call(path)
        assert path in str(err.value) and BAD_INPUTS[case] in str(err.value).lower()


@pytest.mark.parametrize("case", sorted(GOOD_INPUTS))
def test_awkward_images_through_the_pipeline(pipe, corpus, case):
    path = str(corpus[case])
    faces = pipe.detect(path)
    assert isinstance(faces, list)
    for f in pipe.embed(path):
        assert f.embedding is not None and abs(float(np.linalg.norm(f.embedding)) - 1) < 1e-4
    try:
        r = pipe.compare(path, path)
        assert r.similarity == pytest.approx(1.0, abs=1e-4)
    except NoFaceError as e:  # these synthetic pictures hold no face: a clear result, not a crash
        assert path in str(e)
    with open(path, "rb") as fh:  # the same file as bytes
        assert isinstance(pipe.detect(fh.read()), list)


# -------------------------------------------------------------------------------------- CLI, corpus


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_detect_bad_image_one_line_error(capfd, corpus, case):
    path = str(corpus[case])
    rc = main(["detect", path, "--json"])
    out, err = capfd.readouterr()  # file-descriptor level: native library noise would show up here
    assert rc != 0 and out == ""
    _one_clear_line(err, path)


@pytest.mark.parametrize("case", sorted(GOOD_INPUTS))
def test_cli_detect_awkward_image_is_a_result(capfd, corpus, case):
    rc = main(["detect", str(corpus[case]), "--json"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert isinstance(json.loads(out), list) and err == ""


def test_cli_corrupt_data_past_the_header_checks(capfd, tmp_path):
    """Broken compressed data reaches libpng/libjpeg: their stderr chatter must not leak from the CLI."""
    files = corrupt_but_well_framed()
    png, jpg = tmp_path / "corrupt.png", tmp_path / "corrupt.jpg"
    png.write_bytes(files["png"])
    jpg.write_bytes(files["jpeg"])
    rc = main(["detect", str(png), "--json"])
    out, err = capfd.readouterr()
    assert rc != 0 and out == ""
    _one_clear_line(err, str(png), "cannot decode")
    rc = main(["detect", str(jpg), "--json"])  # libjpeg recovers: a (garbled) picture is a result
    out, err = capfd.readouterr()
    assert rc == 0 and json.loads(out) == [] and err == ""


def test_cli_compare_bad_image(capfd, corpus, recognizer):
    good = str(corpus["plain.bmp"])
    for case in ("truncated.png", "text.jpg", "bomb.jpg"):
        bad = str(corpus[case])
        rc = main(["compare", bad, good, "--json", "--recognizer", str(recognizer)])
        out, err = capfd.readouterr()
        assert rc != 0 and out == ""
        _one_clear_line(err, bad)


def test_cli_in_a_real_subprocess(corpus):
    """The installed entry point, not just main(): exit status, one line, no traceback, and no hang."""
    for case in ("truncated.jpg", "bomb_100k.png"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "runtime", "detect", str(corpus[case]), "--json"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stdout == ""
        _one_clear_line(r.stderr, str(corpus[case]))
        print(f"\n{case}: exit {r.returncode} in {time.perf_counter() - t0:.1f} s: {r.stderr.strip()}")


# -------------------------------------------------------------------------------------- bad models


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, recognizer) -> dict[str, tuple[Path, type, str]]:
    """name → (file, expected exception, text the message must contain)."""
    d = tmp_path_factory.mktemp("bad_models")
    good = recognizer.read_bytes()
    files = {
        "truncated": (good[: len(good) // 3], ModelLoadError, ""),
        "text": (b"this is not a model\n", ModelLoadError, ""),
        "empty": (b"", ModelLoadError, ""),
        "random": (np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(), ModelLoadError, ""),
    }
    from runtime.detector import DEFAULT_DETECTOR

    # a real ONNX model, but a detector: no facekit metadata
    files["foreign"] = (DEFAULT_DETECTOR.read_bytes(), ModelMetadataError, "metadata")
    out = {name: (d / f"{name}.onnx", exc, text) for name, (data, exc, text) in files.items()}
    for name, (data, _, _) in files.items():
        out[name][0].write_bytes(data)
    out["no_metadata"] = (make_recognizer(d / "no_metadata.onnx", metadata=False), ModelMetadataError, "metadata")
    out["landmark_model"] = (make_recognizer(d / "lm.onnx", task="landmarks"), ModelMetadataError, "not a recognizer")
    out["missing"] = (d / "missing.onnx", ModelLoadError, "not found")
    return out


@pytest.mark.parametrize("name", ["truncated", "text", "empty", "random", "foreign", "no_metadata",
                                  "landmark_model", "missing"])
def test_bad_recognizer_files_give_clear_errors(bad_models, name, capfd, corpus):
    path, exc, text = bad_models[name]
    with pytest.raises(exc) as err:
        FacePipeline(recognizer=str(path))
    assert str(path) in str(err.value) and text in str(err.value)
    assert "\n" not in str(err.value).strip()
    rc = main(["compare", str(corpus["plain.bmp"]), str(corpus["gray.png"]), "--recognizer", str(path)])
    out, err_text = capfd.readouterr()
    assert rc != 0
    _one_clear_line(err_text, str(path))


# ---------------------------------------------------------------------------------------- threads


def _rss_mib() -> float:
    return status_mib("VmRSS")


def _stress_image(sources: list[np.ndarray], i: int) -> np.ndarray:
    """Image ``i``: a deterministic crop, resize and (for odd i) mirror of one of the portraits."""
    rng = np.random.default_rng(i)
    src = sources[i % len(sources)]
    h, w = src.shape[:2]
    frac = rng.uniform(0.75, 1.0)
    ch, cw = int(h * frac), int(w * frac)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y:y + ch, x:x + cw]
    side = int(rng.integers(110, 200))
    s = side / max(ch, cw)
    img = cv2.resize(crop, (max(1, round(cw * s)), max(1, round(ch * s))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, ::-1]) if i % 2 else img


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc (Linux)")
def test_eight_threads_share_one_pipeline(recognizer, facekit_data):
    sources = [cv2.imread(str(need(facekit_data / "photos" / n))) for n in PORTRAITS]
    pipe = FacePipeline(recognizer=str(recognizer), min_side=128, max_side=256)
    n = STRESS_IMAGES
    rss_start = _rss_mib()
    t0 = time.perf_counter()
    reference = []
    for i in range(n):
        faces = pipe.embed(_stress_image(sources, i))
        reference.append(np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 32), np.float32))
    t_single = time.perf_counter() - t0
    rss_warm = _rss_mib()
    assert sum(len(r) > 0 for r in reference) >= 0.9 * n, "most stress images should contain a face"

    results: list[np.ndarray | None] = [None] * n
    next_index = iter(range(n))
    lock = threading.Lock()

    def work(_: int) -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            faces = pipe.embed(_stress_image(sources, i))
            results[i] = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, 32), np.float32)

    t0 = time.perf_counter()
    run_threads(work, 8, timeout=600)  # re-raises a worker's exception; fails when a worker hangs
    t_threads = time.perf_counter() - t0
    rss_end = _rss_mib()
    print(f"\n{n} images: 1 thread {t_single:.1f} s, 8 threads {t_threads:.1f} s; RSS start {rss_start:.0f} MiB, "
          f"after the single-thread pass {rss_warm:.0f} MiB, end {rss_end:.0f} MiB")
    for i in range(n):
        assert results[i] is not None and results[i].shape == reference[i].shape, i
        np.testing.assert_array_equal(results[i], reference[i], err_msg=f"image {i}")
    assert rss_end - rss_warm < 100, f"RSS grew {rss_end - rss_warm:.0f} MiB over {n} images on 8 threads"

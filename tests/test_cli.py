"""`python -m runtime`: output formats, the matrix PNG, galleries, and one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, need
from runtime.cli import main
from test_pipeline import make_recognizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory) -> str:
    return str(make_recognizer(tmp_path_factory.mktemp("cli_models") / "tiny.onnx", threshold=0.5))


def photo(facekit_data, name) -> str:
    return str(need(facekit_data / "photos" / name))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------- detect


def test_detect_json_format_in_a_subprocess(facekit_data, tmp_path):
    out_img = tmp_path / "annotated.jpg"
    r = run_cli("detect", photo(facekit_data, "group_t1.jpg"), "--json", "--out", str(out_img))
    assert r.returncode == 0, r.stderr
    faces = json.loads(r.stdout)
    assert len(faces) == 6
    for f in faces:
        assert set(f) == {"box", "score", "landmarks"}
        assert len(f["box"]) == 4 and f["box"][0] < f["box"][2] and f["box"][1] < f["box"][3]
        assert 0.5 <= f["score"] <= 1.0
        assert len(f["landmarks"]) == 5 and all(len(p) == 2 for p in f["landmarks"])
    annotated = cv2.imread(str(out_img))
    original = cv2.imread(photo(facekit_data, "group_t1.jpg"))
    assert annotated is not None and annotated.shape == original.shape
    assert not np.array_equal(annotated, original)  # boxes were drawn
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary behind


def test_detect_no_face_is_a_result(capsys, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 160, 3), 200, np.uint8))
    rc, out, err = run_main(capsys, "detect", str(blank), "--json")
    assert rc == 0 and json.loads(out) == [] and err == ""
    rc, out, _ = run_main(capsys, "detect", str(blank))
    assert rc == 0 and "no face found" in out


# ------------------------------------------------------------------------------------------ compare


def test_compare_json(capsys, facekit_data, recognizer, tmp_path):
    a, b = photo(facekit_data, "obama.jpg"), photo(facekit_data, "biden.jpg")
    rc, out, _ = run_main(capsys, "compare", a, a, "--json", "--recognizer", recognizer)
    r = json.loads(out)
    assert rc == 0 and set(r) == {"similarity", "same"}
    assert r["similarity"] == pytest.approx(1.0, abs=1e-4) and r["same"] is True
    rc, out, _ = run_main(capsys, "compare", a, b, "--json", "--recognizer", recognizer, "--threshold", "1.5")
    r = json.loads(out)
    assert rc == 0 and r["same"] is False and -1 <= r["similarity"] <= 1
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((100, 100, 3), np.uint8))
    rc, out, _ = run_main(capsys, "compare", a, str(blank), "--json", "--recognizer", recognizer)
    r = json.loads(out)
    assert rc == 0 and r["similarity"] is None and "no face" in r["error"]


# ------------------------------------------------------------------------------------------- matrix


def test_matrix_writes_a_png_sorted_by_name(capsys, facekit_data, recognizer, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama2.jpg", "biden.jpg", "obama.jpg"):
        shutil.copy(photo(facekit_data, name), folder / name)
    cv2.imwrite(str(folder / "a_blank.png"), np.zeros((80, 80, 3), np.uint8))
    (folder / "notes.txt").write_text("not a photo")
    out_png = tmp_path / "matrix.png"
    rc, out, err = run_main(capsys, "matrix", str(folder), "--out", str(out_png), "--json",
                            "--recognizer", recognizer)
    assert rc == 0, err
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    png = cv2.imread(str(out_png))
    assert png is not None and min(png.shape[:2]) > 200
    r = json.loads(out)
    assert r["names"] == ["a_blank.png", "biden.jpg", "obama.jpg", "obama2.jpg"]
    sim = np.array([[np.nan if v is None else v for v in row] for row in r["similarity"]])
    assert sim.shape == (4, 4) and np.isnan(sim[0]).all()  # the blank image has no face
    np.testing.assert_allclose(np.diag(sim)[1:], 1.0, atol=1e-4)
    np.testing.assert_allclose(sim[1:, 1:], sim[1:, 1:].T, atol=1e-6)
    assert len(r["skipped"]) == 1 and r["skipped"][0].startswith("a_blank.png")


def test_matrix_of_an_empty_folder_is_an_error(capsys, tmp_path, recognizer):
    rc, out, err = run_main(capsys, "matrix", str(tmp_path), "--out", str(tmp_path / "m.png"), "--recognizer", recognizer)
    assert rc != 0 and "no images" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- enroll/identify


def test_enroll_then_identify(capsys, facekit_data, recognizer, tmp_path):
    gallery = str(tmp_path / "people.npz")
    rc, out, err = run_main(capsys, "enroll", gallery, "obama", photo(facekit_data, "obama.jpg"),
                            "--recognizer", recognizer)
    assert rc == 0, err
    rc, out, err = run_main(capsys, "enroll", gallery, "biden", photo(facekit_data, "biden.jpg"),
                            "--recognizer", recognizer)
    assert rc == 0, err
    assert "2 people" in out
    rc, out, err = run_main(capsys, "identify", gallery, photo(facekit_data, "biden.jpg"), "--top-k", "2", "--json",
                            "--recognizer", recognizer)
    assert rc == 0, err
    matches = json.loads(out)
    assert [m["name"] for m in matches][0] == "biden" and matches[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert len(matches) == 2 and matches[1]["similarity"] < matches[0]["similarity"]


# ---------------------------------------------------------------------------------------- bad input


def _bad_inputs(tmp: Path, facekit_data: Path, recognizer: str) -> dict[str, list[str]]:
    (tmp / "text.jpg").write_text("hello, I am not a JPEG")
    good = Path(photo(facekit_data, "obama.jpg")).read_bytes()
    (tmp / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "foreign.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    (tmp / "gallery.npz").write_bytes(b"PK\x03\x04 broken zip")
    obama = photo(facekit_data, "obama.jpg")
    return {
        "text as image": ["detect", str(tmp / "text.jpg")],
        "truncated jpeg": ["detect", str(tmp / "truncated.jpg"), "--json"],
        "empty file": ["compare", str(tmp / "empty.png"), obama, "--recognizer", recognizer],
        "missing image": ["detect", str(tmp / "nope.jpg")],
        "folder as image": ["detect", str(tmp)],
        "foreign recognizer": ["compare", obama, obama, "--recognizer", str(tmp / "foreign.onnx")],
        "missing detector": ["detect", obama, "--detector", str(tmp / "nope.onnx")],
        "image as recognizer": ["compare", obama, obama, "--recognizer", obama],
        "corrupt gallery": ["identify", str(tmp / "gallery.npz"), obama, "--recognizer", recognizer],
        "missing gallery": ["identify", str(tmp / "none.npz"), obama, "--recognizer", recognizer],
    }


def test_bad_input_gives_one_line_and_non_zero_exit(capsys, facekit_data, recognizer, tmp_path):
    for case, args in _bad_inputs(tmp_path, facekit_data, recognizer).items():
        rc, out, err = run_main(capsys, *args)
        assert rc != 0, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert "Traceback" not in err and out == "", case


@pytest.mark.parametrize("case", ["truncated jpeg", "foreign recognizer", "corrupt gallery"])
def test_bad_input_in_a_subprocess_has_no_traceback(facekit_data, recognizer, tmp_path, case):
    r = run_cli(*_bad_inputs(tmp_path, facekit_data, recognizer)[case])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""

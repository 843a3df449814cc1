"""train/make_aligned.py on real photos: crops land on the template, failures are reported, runs resume."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from runtime.geometry import ARCFACE_TEMPLATE_112, alignment_matrix, transform_points
from runtime.shipped import ALIGNER as SHIPPED_ALIGNER
from tests.conftest import need
from train.make_aligned import (
    Options,
    choose_face,
    make_aligned,
    main,
    sources_from_list,
    sources_from_tree,
)

N_CELEBA = 6  # a handful of CelebA in-the-wild photos (the first ones the list names)


@pytest.fixture(scope="module")
def detector():
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.detector import DEFAULT_DETECTOR, load_detector

    return load_detector(OnnxRuntimeBackend(str(DEFAULT_DETECTOR), device="cpu", threads=1))


@pytest.fixture(scope="module")
def aligned(facekit_data, tmp_path_factory):
    """make_aligned over a list file: real CelebA photos and portraits, an unreadable file, a face-less
    image, a group photo and one photo listed under two identities."""
    wild = need(facekit_data / "celeba" / "wild")
    photos = need(facekit_data / "photos")
    labels = need(facekit_data / "celeba" / "identity_wild.txt")
    tmp = tmp_path_factory.mktemp("make_aligned")
    src = tmp / "src"
    src.mkdir()
    lines = []
    with open(labels) as f:
        for line in f.readlines()[:N_CELEBA]:
            name, identity = line.split()
            os.symlink(wild / name, src / name)
            lines.append(f"{name} {identity}")
    for name in ("obama.jpg", "biden.jpg", "paul_rudd.jpg"):
        os.symlink(photos / name, src / name)
        lines.append(f"{name} {name.split('.')[0]}")
    os.symlink(photos / "group_t1.jpg", src / "group.jpg")
    lines.append("group.jpg crowd")
    (src / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    lines.append("broken.jpg nobody")
    rng = np.random.default_rng(0)  # smooth noise: no face in it
    blank = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (0, 0), 8)
    cv2.imwrite(str(src / "noface.png"), blank)
    lines.append("noface.png nobody")
    lines += [f"{lines[0].split()[0]} someone_else"]  # the first photo again, under another identity
    lines.append("missing.jpg ghost")
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp / "out"
    assert main(["--list", str(tmp / "list.txt"), "--root", str(src), "--out", str(out), "--workers", "1", "--debug",
                 "--no-progress"]) == 0
    rows = {r["source"]: r for r in csv.DictReader(open(out / "manifest.csv"))}
    return tmp, out, rows


def test_every_source_is_in_the_manifest_with_a_reason(aligned):
    tmp, out, rows = aligned
    listed = {line.split()[0] for line in (tmp / "list.txt").read_text().splitlines()}
    assert set(rows) == listed  # nothing dropped silently
    assert rows["broken.jpg"]["status"] == "failed" and rows["broken.jpg"]["reason"].startswith("unreadable")
    assert rows["missing.jpg"]["status"] == "failed" and rows["missing.jpg"]["reason"].startswith("unreadable")
    assert rows["noface.png"]["status"] == "failed" and rows["noface.png"]["reason"] == "no face"
    assert rows["group.jpg"]["status"] == "failed" and rows["group.jpg"]["reason"] == "several faces"
    assert int(rows["group.jpg"]["faces"]) >= 2
    first = next(iter(line.split()[0] for line in (tmp / "list.txt").read_text().splitlines()))
    assert rows[first]["reason"].startswith("conflicting labels")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == sum(r["status"] == "failed" for r in rows.values())
    assert summary["failure_reasons"]["unreadable"] == 2
    assert (out / "debug" / "failed" / "group.jpg").is_file()


def test_crops_are_written_per_identity_and_listed(aligned):
    _, out, rows = aligned
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) >= N_CELEBA - 1 + 3 - 1  # the celebrities minus the conflicting one, the portraits
    listed = [line.split() for line in (out / "list.txt").read_text().splitlines()]
    assert sorted(p for p, _ in listed) == sorted(r["output"] for r in ok)
    for path, identity in listed:
        assert path.split("/")[0] == identity
        crop = cv2.imread(str(out / path))
        assert crop is not None and crop.shape == (112, 112, 3)


def test_crops_put_the_eyes_on_the_template(aligned, detector):
    """Re-detect the eyes on every written crop. A 5-point similarity warp cannot put both eyes of every
    face exactly on the template (the fit spreads the residual of the face's own proportions over all
    five points), so: the eyes on average within 2 px of the template, no face off by more than 6 px,
    and the re-detected eyes within 2 px (median) of where the warp sent the detector's eyes."""
    _, out, rows = aligned
    errors, consistency = [], []
    for r in rows.values():
        if r["status"] != "ok":
            continue
        crop = cv2.imread(str(out / r["output"]))
        found = detector.detect(crop)
        assert found, f"no face re-detected on the crop of {r['source']}"
        eyes = max(found, key=lambda d: d.score).landmarks[:2]
        errors.append(eyes - ARCFACE_TEMPLATE_112[:2])
        used = np.array(r["landmarks"].split(), float).reshape(5, 2)
        warped = transform_points(used, alignment_matrix(used))[:2]
        consistency.append(np.linalg.norm(eyes - warped, axis=1))
    errors = np.array(errors)
    mean_offset = np.linalg.norm(errors.mean(0), axis=1)
    assert np.all(mean_offset <= 2.0), f"mean eye offset from the template {mean_offset} px"
    assert np.linalg.norm(errors, axis=2).max() <= 6.0, np.linalg.norm(errors, axis=2)
    assert np.median(consistency) <= 2.0, consistency


def test_rerun_skips_done_photos_and_redoes_missing_crops(aligned):
    tmp, out, rows = aligned
    done = sorted(out.rglob("*.png"))
    crops = [p for p in done if "debug" not in p.parts]
    mtimes = {p: p.stat().st_mtime_ns for p in crops}
    victim = crops[0]
    victim.unlink()
    sources, conflicting = sources_from_list(tmp / "list.txt", tmp / "src")
    summary = make_aligned(sources, out, Options(), workers=1, conflicting=conflicting, progress=False)
    assert victim.is_file()  # its crop was missing: done again
    for p, t in mtimes.items():
        if p != victim:
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert summary["sources"] == len(rows)
    again = {r["source"]: r["status"] for r in csv.DictReader(open(out / "manifest.csv"))}
    assert again == {k: r["status"] for k, r in rows.items()}


def test_tree_input_with_two_workers(facekit_data, tmp_path):
    photos = need(facekit_data / "photos")
    for person in ("obama", "biden"):
        (tmp_path / "src" / person).mkdir(parents=True)
    os.symlink(photos / "obama.jpg", tmp_path / "src" / "obama" / "a.jpg")
    os.symlink(photos / "obama2.jpg", tmp_path / "src" / "obama" / "b.jpg")
    os.symlink(photos / "biden.jpg", tmp_path / "src" / "biden" / "a.jpg")
    sources = sources_from_tree(tmp_path / "src")
    assert [(s.rel, s.identity) for s in sources] == [("biden/a.jpg", "biden"), ("obama/a.jpg", "obama"),
                                                     ("obama/b.jpg", "obama")]
    summary = make_aligned(sources, tmp_path / "out", Options(image_format="jpg"), workers=2, progress=False)
    assert summary["ok"] == 3 and summary["identities"] == 2
    assert (tmp_path / "out" / "obama" / "b.jpg").is_file()


def test_names_and_files_with_spaces_reach_the_trainer_intact(facekit_data, tmp_path):
    from train.datasets import list_source

    photos = need(facekit_data / "photos")
    for person, photo, name in (("Barack Obama", "obama.jpg", "at the podium.jpg"), ("Joe Biden", "biden.jpg", "a.jpg")):
        (tmp_path / "src" / person).mkdir(parents=True)
        os.symlink(photos / photo, tmp_path / "src" / person / name)
    out = tmp_path / "out"
    assert make_aligned(sources_from_tree(tmp_path / "src"), out, Options(), workers=1, progress=False)["ok"] == 2
    listed = list_source(out / "list.txt")
    assert listed.class_names == ["Barack Obama", "Joe Biden"] and len(listed) == 2
    assert sorted(listed.keys) == ["Barack Obama/at the podium.png", "Joe Biden/a.png"]


@dataclass
class _Det:
    box: np.ndarray
    score: float


def test_several_faces_policy():
    shape = (400, 400, 3)
    big_centre = _Det(np.array([150, 150, 250, 250], np.float32), 0.99)
    small_side = _Det(np.array([0, 0, 40, 40], np.float32), 0.99)
    twin = _Det(np.array([160, 140, 255, 240], np.float32), 0.99)
    doubtful = _Det(np.array([100, 100, 200, 200], np.float32), 0.55)
    tiny = _Det(np.array([10, 10, 20, 20], np.float32), 0.99)
    assert choose_face([], shape) == (None, "no face")
    assert choose_face([tiny], shape) == (None, "face too small")
    assert choose_face([small_side, big_centre], shape) == (1, "")
    assert choose_face([big_centre, twin], shape) == (None, "several faces")
    assert choose_face([doubtful, big_centre], shape) == (1, "")  # confident face outweighs a doubtful one
    assert choose_face([tiny, big_centre], shape) == (1, "")  # too-small faces do not compete


@pytest.mark.skipif(not SHIPPED_ALIGNER.is_file(), reason="runtime/models/aligner.onnx is absent")
def test_aligner_landmarks_option(facekit_data, tmp_path):
    """--landmarks aligner: the crop is warped with the refined points, which the manifest records."""
    photos = need(facekit_data / "photos")
    (tmp_path / "src" / "obama").mkdir(parents=True)
    os.symlink(photos / "obama.jpg", tmp_path / "src" / "obama" / "a.jpg")
    sources = sources_from_tree(tmp_path / "src")
    opts = Options(landmarks="aligner", aligner=str(SHIPPED_ALIGNER))
    assert make_aligned(sources, tmp_path / "ali", opts, workers=1, progress=False)["ok"] == 1
    assert make_aligned(sources, tmp_path / "det", Options(), workers=1, progress=False)["ok"] == 1
    rows = [next(csv.DictReader(open(tmp_path / d / "manifest.csv"))) for d in ("ali", "det")]
    ali, det = (np.array(r["landmarks"].split(), float).reshape(5, 2) for r in rows)
    iod = np.linalg.norm(det[0] - det[1])
    assert 0 < np.abs(ali - det).max() < 0.2 * iod  # refined, and still the same face


def test_like_crops_in_a_recognizers_own_framing(facekit_data, tmp_path, detector):
    """``--like MODEL``: crops get the size and template from the model's metadata (here a recognizer framed
    like dlib's 150×150 chip), and the face's eyes land on that template, not the ArcFace one."""
    from runtime.geometry import DLIB_CHIP_TEMPLATE_150
    from runtime.preprocess import DLIB_CHIP_SPEC
    from tests.test_pipeline import make_recognizer

    model = make_recognizer(tmp_path / "chip.onnx", DLIB_CHIP_SPEC)
    src = tmp_path / "src" / "obama"
    src.mkdir(parents=True)
    os.symlink(need(facekit_data / "photos" / "obama.jpg"), src / "obama.jpg")
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--like", str(model),
                 "--workers", "1", "--no-progress"]) == 0
    crop = cv2.imread(str(next((tmp_path / "out").rglob("*.png"))))
    assert crop.shape == (150, 150, 3)
    big = cv2.resize(crop, (300, 300))  # RetinaFace wants some context around a face this tight
    eyes = max(detector.detect(big), key=lambda d: d.score).landmarks[:2] / 2
    assert np.linalg.norm(eyes - DLIB_CHIP_TEMPLATE_150[:2], axis=1).max() < 4.0, eyes


def test_like_a_model_that_is_not_a_recognizer_is_a_usage_error(tmp_path, capsys):
    from runtime.detector import DEFAULT_DETECTOR

    (tmp_path / "src" / "someone").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "src" / "someone" / "a.jpg"), np.full((64, 64, 3), 128, np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--like", str(DEFAULT_DETECTOR)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--like:" in err and "Traceback" not in err

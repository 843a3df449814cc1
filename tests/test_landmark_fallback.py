"""The aligner's fallback rule: measured on training faces, stored in the model, applied by the runtime."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation.landmarks import evaluate_landmarks, fallback_rule, format_table
from runtime.landmark_fallback import FallbackRule, disagreement
from runtime.landmarks import LandmarkRefiner
from tests.conftest import ROOT, link_faces, need

SHIPPED = ROOT / "runtime" / "models" / "aligner.onnx"
FACE = np.array([[100.0, 100.0], [140.0, 100.0], [120.0, 125.0], [105.0, 145.0], [135.0, 145.0]])


def test_disagreement_is_relative_to_the_detectors_eye_distance():
    moved = FACE + [0.0, 4.0]  # every point 4 px off, inter-ocular distance 40
    assert np.allclose(disagreement(moved, FACE), 0.1)
    collapsed = FACE.copy()
    collapsed[1] = collapsed[0]  # a profile: the detector's eyes on top of each other
    assert disagreement(moved, collapsed)[0] > 0.1
    assert np.isinf(disagreement(FACE, np.zeros((5, 2))))[0]


def test_rule_keeps_only_confident_agreeing_points():
    rule = FallbackRule(min_peak=0.5, max_disagreement=0.15)
    points = np.stack([FACE + [0, 2], FACE + [0, 2], FACE + [0, 20]])  # 0.05, 0.05, 0.5 of the eye distance
    peaks = np.array([[0.9] * 5, [0.9, 0.9, 0.4, 0.9, 0.9], [0.9] * 5])
    assert rule.keep(points, peaks, np.stack([FACE] * 3)).tolist() == [True, False, False]
    assert FallbackRule.from_metadata({"fallback": rule.to_dict()}) == rule
    assert FallbackRule.from_metadata({}) is None
    with pytest.raises(ValueError, match="min_peak and max_disagreement"):
        FallbackRule.from_metadata({"fallback": {"min_peak": 0.5}})


def test_rule_is_the_coverage_quantile_of_the_training_faces():
    rng = np.random.default_rng(0)
    det = np.stack([FACE] * 1000)
    shift = rng.uniform(0, 8, 1000)  # disagreement uniform in [0, 0.2]
    ali = det + np.stack([np.zeros(1000), shift], 1)[:, None, :]
    peaks = rng.uniform(0.3, 1.0, (1000, 5))
    rule = fallback_rule(det, ali, peaks, coverage=0.9)
    assert abs(rule.max_disagreement - 0.18) < 0.01
    assert abs(rule.min_peak - np.quantile(peaks.min(1), 0.1)) < 1e-3
    assert rule.keep(ali, peaks, det).mean() > 0.8
    with pytest.raises(ValueError, match="coverage"):
        fallback_rule(det, ali, peaks, coverage=1.0)


def _with_rule(tmp_path: Path, rule: dict | None) -> Path:
    """A copy of the shipped aligner with ``rule`` as its fallback metadata."""
    import onnx

    from export.onnx_utils import read_metadata, save_onnx, set_metadata

    proto = onnx.load(str(SHIPPED))
    meta = read_metadata(proto)
    meta.pop("fallback", None)
    if rule is not None:
        meta["fallback"] = rule
    set_metadata(proto, meta)
    name = "none" if rule is None else f"{rule['min_peak']}-{rule['max_disagreement']}"
    return save_onnx(proto, tmp_path / f"aligner-{name}.onnx")


@pytest.fixture(scope="module")
def obama(facekit_data):
    """The photo, its detected face's box and the detector's points."""
    from runtime.detector import load_detector

    image = cv2.imread(str(need(facekit_data / "photos" / "obama.jpg")))
    face = max(load_detector().detect(image), key=lambda d: d.score)
    return image, face.box, face.landmarks


@pytest.mark.skipif(not SHIPPED.is_file(), reason="runtime/models/aligner.onnx not shipped")
def test_the_refiner_follows_the_rule_in_the_model(obama, tmp_path):
    image, box, det = obama
    never = LandmarkRefiner(str(_with_rule(tmp_path, {"min_peak": 2.0, "max_disagreement": 1.0})))
    always = LandmarkRefiner(str(_with_rule(tmp_path, {"min_peak": 0.0, "max_disagreement": 1e9})))
    plain = LandmarkRefiner(str(_with_rule(tmp_path, None)))
    own = plain.refine(image, box, det)
    assert plain.fallback is None and not np.allclose(own, det, atol=0.5)  # the aligner moves the points
    assert np.array_equal(never.refine(image, box, det), det.astype(np.float32))
    assert np.allclose(always.refine(image, box, det), own)
    assert np.allclose(never.refine(image, box), plain.refine(image, box))  # no detector points to fall back to
    off = LandmarkRefiner(str(never.path), fallback=False)
    assert off.fallback is None and np.allclose(off.refine(image, box, det), own)
    details = never.refine_details(image, [box], [det])
    assert details.kept.tolist() == [False] and np.allclose(details.aligner[0], own)
    assert details.peaks.shape == (1, 5) and 0 < details.peaks.min() <= details.peaks.max() < 1.5


@pytest.mark.skipif(not SHIPPED.is_file(), reason="runtime/models/aligner.onnx not shipped")
def test_the_pipeline_reads_the_rule_from_the_aligner(obama, tmp_path):
    from runtime.pipeline import FacePipeline
    from runtime.preprocess import RECOGNIZER_SPEC

    image, _, det = obama
    never = _with_rule(tmp_path, {"min_peak": 2.0, "max_disagreement": 1.0})
    faces = FacePipeline(landmarks="aligner", aligner=str(never), preprocess=RECOGNIZER_SPEC).detect(image)
    assert np.array_equal(faces[0].landmarks, det.astype(np.float32))


@pytest.mark.skipif(not SHIPPED.is_file(), reason="runtime/models/aligner.onnx not shipped")
def test_fallback_tool_measures_and_stores_the_rule(facekit_data, tmp_path):
    data = link_faces(facekit_data / "landmarks_300w" / "afw", tmp_path / "faces", 6)
    out = tmp_path / "with_rule.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "aligner_fallback.py"), str(SHIPPED), "--data", str(data),
                           "--coverage", "0.9", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    refiner = LandmarkRefiner(str(out))
    assert refiner.metadata["fallback_measured_on"] == {"data": ["faces"], "faces": 6, "coverage": 0.9}
    assert 0 < refiner.fallback.min_peak < 1.5 and 0 < refiner.fallback.max_disagreement < 1
    # with a 90 % rule measured on these six faces, the aligner keeps most of them
    result = evaluate_landmarks(data, {"aligner": refiner, "aligner_raw": LandmarkRefiner(str(out), fallback=False)},
                                progress=False)
    assert set(result) >= {"aligner", "aligner_raw", "detector"} and result["images"] == 6
    table = format_table(result)
    assert "| aligner (with_rule.onnx)" in table and "| aligner's own points, no fallback (with_rule.onnx)" in table
    bad = subprocess.run([sys.executable, str(ROOT / "export" / "aligner_fallback.py"), str(tmp_path / "no.onnx"),
                          "--data", str(data)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr

"""The default benchmark's landmark-source section: both sources side by side, reuse, NME, markdown."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.shipped import ALIGNER as SHIPPED_ALIGNER
from runtime.shipped import RECOGNIZER as SHIPPED_RECOGNIZER
from tests.conftest import link_faces, need


def _small_data(facekit_data: Path, root: Path) -> Path:
    """A data folder with LFW cut to 1 same + 1 different pair per fold and 6 faces of 300-W test."""
    lfw = need(facekit_data / "lfw" / "pairs.txt").parent
    lines = (lfw / "pairs.txt").read_text().splitlines()
    body = [ln for ln in lines[1:] if ln.strip()]
    keep = [body[f * 600 + k] for f in range(10) for k in (0, 300)]
    (root / "lfw").mkdir(parents=True)
    (root / "lfw" / "images").symlink_to(lfw / "images")
    (root / "lfw" / "pairs.txt").write_text("10 1\n" + "\n".join(keep) + "\n")
    link_faces(facekit_data / "landmarks_300w" / "test", root / "landmarks_300w" / "test", 6)
    return root


@pytest.mark.skipif(not (SHIPPED_RECOGNIZER.is_file() and SHIPPED_ALIGNER.is_file()), reason="shipped models absent")
def test_both_sources_side_by_side_with_nme(facekit_data, tmp_path):
    from benchmarks.landmark_sources import compare_landmark_sources, markdown
    from benchmarks.harness import make_embedder
    from evaluation.pairs import load_lfw

    data = _small_data(facekit_data, tmp_path / "data")
    embedder = make_embedder(SHIPPED_RECOGNIZER, "onnxruntime", "cpu")
    images = [str(p) for p in load_lfw(data / "lfw").images]
    # detector embeddings "already computed by the run": all alike, so every pair looks the same (50 %)
    known = {"detector": {p: np.ones(128, np.float32) / np.sqrt(128) for p in images}}
    section = compare_landmark_sources(data, embedder, known, use_cache=False, progress=False, log=lambda m: None)
    assert section["sets"] == ["LFW"] and any("CFP not found" in n for n in section["notes"])
    assert section["accuracy"]["detector"]["LFW"]["accuracy"] == 0.5  # reused, not embedded again
    aligner = section["accuracy"]["aligner"]["LFW"]
    assert aligner["pairs"] == 20 and aligner["accuracy"] >= 0.8  # really embedded with the aligner's points
    nme = section["nme_300w_test"]
    assert nme["images"] + nme["missed"] == 6
    for key in ("aligner", "aligner_raw", "detector"):
        assert 0 < nme[key]["nme"] < 0.5
    text = markdown(section)
    assert "| detector's 5 points | 50.00 ± 0.00 |" in text
    assert "aligner (aligner.onnx" in text and "NME 300-W test" in text and "own points" in text


def test_markdown_without_data_names_what_is_missing():
    from benchmarks.landmark_sources import markdown

    section = {"accuracy": {}, "sets": [], "aligner_model": "runtime/models/aligner.onnx",
               "notes": ["landmark sources: LFW not found at /nowhere/lfw"]}
    assert "LFW not found" in markdown(section)

"""OpenVINO backend: the same answers as ONNX Runtime at f32, precisions, metadata without onnx, errors, threads,
and a whole pipeline in a process where onnxruntime cannot be imported."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (a core requirement of facekit)")

from conftest import ROOT, need  # noqa: E402
from threads import run_threads  # noqa: E402
from runtime.backends import load_model, load_model_bytes  # noqa: E402
from runtime.backends.base import ModelLoadError  # noqa: E402
from runtime.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from runtime.backends.openvino import (BF16_MIN_COSINE, OpenVinoBackend, bf16_verdict, is_bf16,  # noqa: E402
                                       min_row_cosine, native_bf16, verdict_file)
from runtime.detector import DEFAULT_DETECTOR  # noqa: E402
from runtime.metadata import ModelMetadataError, preprocess_spec, read_onnx_metadata  # noqa: E402
from runtime.pipeline import DEFAULT_ALIGNER, DEFAULT_RECOGNIZER, FacePipeline  # noqa: E402
from runtime.preprocess import to_model_input  # noqa: E402
from runtime.sample_face import sample_crops  # noqa: E402
from runtime.shipped import MODELS_DIR, RECOGNIZER_INT8  # noqa: E402

NO_BF16 = f"this CPU has no native bf16 (AMX / AVX512-BF16); OpenVINO reports {native_bf16()!r}"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def recognizer() -> Path:
    return need(DEFAULT_RECOGNIZER)


@pytest.fixture(scope="module")
def crops_input(recognizer) -> np.ndarray:
    spec = preprocess_spec(OnnxRuntimeBackend(str(recognizer), device="cpu").metadata)
    return to_model_input(sample_crops(spec), spec, color_order="BGR")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A private OpenVINO cache for the test (compiled blobs and bf16 verdicts)."""
    folder = tmp_path / "ov-cache"
    monkeypatch.setenv("FACEKIT_OPENVINO_CACHE", str(folder))
    return folder


# ----------------------------------------------------------------------------------------- metadata


def test_onnx_metadata_is_read_without_onnx_as_onnxruntime_reads_it(tmp_path):
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        ort_props = dict(OnnxRuntimeBackend(str(path), device="cpu").session.get_modelmeta().custom_metadata_map)
        assert read_onnx_metadata(path) == ort_props, path.name
        assert read_onnx_metadata(path.read_bytes()) == ort_props
    assert read_onnx_metadata(DEFAULT_DETECTOR.read_bytes()) == {}
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(need(DEFAULT_ALIGNER).read_bytes()[:5000])
    for bad in (b"", b"not an onnx model at all", truncated):
        with pytest.raises(ModelMetadataError, match="not an ONNX model"):
            read_onnx_metadata(bad)


# ---------------------------------------------------------------------------------- f32 = ONNX Runtime


def test_f32_recognizer_equals_onnxruntime(recognizer, crops_input, cache):
    ref = OnnxRuntimeBackend(str(recognizer), device="cpu")
    b = OpenVinoBackend(str(recognizer), precision="f32")
    assert b.name == "openvino" and b.device == "OpenVINO CPU f32" and b.precision == "f32"
    assert b.metadata == ref.metadata and b.raw_metadata == ref.raw_metadata
    assert b.input_name == ref.input_name and b.output_names == ref.output_names
    assert b.input_shape == [None, 3, 150, 150] and b.fixed_batch is None and b.max_batch is None
    cos = _cos(b.run(crops_input)[0], ref.run(crops_input)[0])
    assert cos.min() >= 0.99999, cos.min()
    assert list(cache.iterdir()), "compiled blob kept in the cache folder"


def test_f32_detector_from_bytes_and_aligner_equal_onnxruntime(cache):
    from runtime.detector import sample_inputs as detector_inputs
    from runtime.landmarks import sample_inputs as aligner_inputs

    det = load_model_bytes(DEFAULT_DETECTOR.read_bytes(), backend="openvino", label="retinaface")
    det_ref = OnnxRuntimeBackend(str(DEFAULT_DETECTOR), device="cpu")
    assert det.device == "OpenVINO CPU f32" and det.path == "retinaface"
    assert [s[-1] for s in det.output_shapes] == [4, 2, 10]
    for x in detector_inputs(det):
        assert min_row_cosine([det_ref.run(x)], [det.run(x)]) >= 0.99999
    aligner = load_model(str(need(DEFAULT_ALIGNER)), backend="openvino")
    ali_ref = OnnxRuntimeBackend(str(DEFAULT_ALIGNER), device="cpu")
    x = aligner_inputs(aligner)[0]
    assert x.shape == (2, 3, 128, 128)
    np.testing.assert_allclose(aligner.run(x)[0], ali_ref.run(x)[0], atol=1e-4)


def test_pipeline_on_openvino_equals_onnxruntime(facekit_data, cache):
    photos = [need(facekit_data / "photos" / n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")]
    ovp, ortp = FacePipeline(backend="openvino"), FacePipeline(backend="onnxruntime")
    f32 = set(ovp.providers.values()) == {"OpenVINO CPU f32"}
    assert f32 or native_bf16(), ovp.providers
    for photo in photos:
        a, b = ovp.subject_face(photo), ortp.subject_face(photo)
        assert np.abs(a.box - b.box).max() < (0.5 if f32 else 2.0)
        assert float(a.embedding @ b.embedding) >= (0.99999 if f32 else BF16_MIN_COSINE)
    assert ovp.compare(photos[0], photos[1]).same is True and ovp.compare(photos[0], photos[2]).same is False


# ---------------------------------------------------------------------------------------- precisions


def test_int8_qdq_model_runs_int8_and_agrees_with_the_qdq_graph(crops_input, cache):
    path = need(RECOGNIZER_INT8)
    b = OpenVinoBackend(str(path))
    assert b.precision == "int8" and b.device.startswith("OpenVINO CPU int8") and "Q/DQ" in b.precision_reason
    exact = OnnxRuntimeBackend(str(path), device="cpu", optimize=False)  # the Q/DQ graph as written
    assert _cos(b.run(crops_input)[0], exact.run(crops_input)[0]).min() > 0.99
    with pytest.raises(ModelLoadError, match="runs at precision 'int8'"):
        OpenVinoBackend(str(path), precision="f32")
    with pytest.raises(ModelLoadError, match="needs an INT8 Q/DQ model"):
        OpenVinoBackend(str(need(DEFAULT_RECOGNIZER)), precision="int8")


def test_compiled_precision_is_read_from_openvino_types():
    assert is_bf16(ov.Type.bf16) and is_bf16("bf16")
    assert not is_bf16(ov.Type.f32) and not is_bf16(ov.Type.f16) and not is_bf16("f32")


def test_auto_precision_without_native_bf16_is_f32(recognizer, cache):
    if native_bf16():
        pytest.skip(f"this CPU has native bf16 ({native_bf16()}); see the bf16 tests")
    b = OpenVinoBackend(str(recognizer))
    assert b.precision == "f32" and "no native bf16" in b.precision_reason
    with pytest.raises(ModelLoadError, match="needs a CPU with native bf16"):
        OpenVinoBackend(str(recognizer), precision="bf16")


def test_bf16_passes_parity_and_auto_keeps_the_verdict(recognizer, crops_input, cache):
    if not native_bf16():
        pytest.skip(NO_BF16)
    ref = OpenVinoBackend(str(recognizer), precision="f32")
    explicit = OpenVinoBackend(str(recognizer), precision="bf16")
    assert explicit.device == f"OpenVINO CPU bf16 ({native_bf16()})"
    assert _cos(explicit.run(crops_input)[0], ref.run(crops_input)[0]).min() >= BF16_MIN_COSINE
    auto = OpenVinoBackend(str(recognizer))
    assert auto.precision == "bf16" and "passed parity" in auto.precision_reason
    records = list(cache.glob("facekit-bf16-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["min_cosine"] >= BF16_MIN_COSINE
    assert OpenVinoBackend(str(recognizer)).precision == "bf16"  # from the kept verdict


def test_a_kept_verdict_is_used_instead_of_a_new_check(recognizer, crops_input, cache):
    """The verdict file for (model, inputs, CPU, OpenVINO) decides without compiling bf16 again."""
    b = OpenVinoBackend(str(recognizer), precision="f32", cache_dir=cache)
    record = verdict_file(b, [crops_input], cache)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"min_cosine": 0.5, "inputs": 16}))
    assert bf16_verdict(b, [crops_input], cache)["min_cosine"] == 0.5
    assert verdict_file(b, [crops_input[:2]], cache) != record  # other inputs: another verdict


def test_min_row_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert min_row_cosine([[a]], [[a * 3]]) == pytest.approx(1.0)
    assert min_row_cosine([[a]], [[np.array([[1.0, 0.0], [2.0, 0.0]])]]) == pytest.approx(0.0)
    assert min_row_cosine([[np.zeros((1, 3))]], [[np.zeros((1, 3))]]) == 1.0
    for bad in (np.inf, np.nan):  # an output that overflowed or went NaN never agrees
        assert min_row_cosine([[a]], [[np.array([[1.0, 2.0], [bad, 0.0]])]]) == -1.0
        assert min_row_cosine([[np.array([[bad, 1.0]])]], [[np.array([[1.0, 1.0]])]]) == -1.0


# ------------------------------------------------------------------------------------- errors, cache


def test_clear_load_errors(tmp_path, recognizer, cache):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(recognizer.read_bytes()[:100_000])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    for path in (truncated, junk):
        with pytest.raises(ModelLoadError, match="not a loadable ONNX model") as e:
            OpenVinoBackend(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(str(tmp_path / "missing.onnx"), backend="openvino")
    with pytest.raises(ModelLoadError, match="runs on the CPU"):
        OpenVinoBackend(str(recognizer), device="cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVinoBackend(str(recognizer), precision="fp8")


def test_cache_can_be_turned_off(recognizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEKIT_OPENVINO_CACHE", "off")
    monkeypatch.setenv("FACEKIT_CACHE", str(tmp_path / "facekit"))
    OpenVinoBackend(str(recognizer), precision="f32")
    assert not (tmp_path / "facekit").exists()
    OpenVinoBackend(str(recognizer), precision="f32", cache_dir=tmp_path / "mine")
    assert list((tmp_path / "mine").iterdir())


# -------------------------------------------------------------------------------------------- threads


def test_eight_threads_share_one_backend(recognizer, crops_input, cache):
    b = OpenVinoBackend(str(recognizer), precision="f32")
    batches = [crops_input[i:i + 1 + i % 3] for i in range(12)]
    reference = [b.run(x)[0] for x in batches]
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        for j in range(len(batches)):
            i = (j + k) % len(batches)
            out = b.run(batches[i])[0]
            if k == 0:
                results[i] = out
            np.testing.assert_array_equal(out, reference[i])

    run_threads(work, 8, timeout=120)
    assert len(results) == len(batches)
    assert b._pool._created <= max(1, b.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))


def test_four_threads_share_one_openvino_pipeline(facekit_data, cache):
    import cv2

    photos = [cv2.imread(str(need(facekit_data / "photos" / n))) for n in
              ("obama.jpg", "biden.jpg", "kate_siegel.jpg", "paul_rudd.jpg", "group_t1.jpg")]
    pipe = FacePipeline(backend="openvino", landmarks="aligner", max_side=320)
    assert all(v.startswith("OpenVINO CPU") for v in pipe.providers.values())
    reference = [np.stack([f.embedding for f in pipe.embed(p)]) for p in photos]

    def work(k: int) -> None:
        for j in range(2 * len(photos)):
            i = (j + k) % len(photos)
            np.testing.assert_array_equal(np.stack([f.embedding for f in pipe.embed(photos[i])]), reference[i])

    run_threads(work, 4)


# ------------------------------------------------------------------------------- without onnxruntime


BLOCK_ORT = """
import sys
class _NoOnnxRuntime:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("onnxruntime is blocked in this test")
sys.meta_path.insert(0, _NoOnnxRuntime())
"""


@pytest.mark.slow
def test_pipeline_runs_on_openvino_alone(facekit_data, tmp_path):
    """`FacePipeline()` (detector bytes, recognizer, aligner, INT8) in a process where onnxruntime is blocked."""
    obama, obama2 = need(facekit_data / "photos" / "obama.jpg"), need(facekit_data / "photos" / "obama2.jpg")
    need(DEFAULT_RECOGNIZER)
    (tmp_path / "sitecustomize.py").write_text(BLOCK_ORT)
    script = f"""
import json, sys
try:
    import onnxruntime
    sys.exit("onnxruntime was importable")
except ImportError:
    pass
from runtime.backends import available_backends
from runtime.pipeline import FacePipeline
out = {{"available": available_backends()}}
for name, kw in (("default", {{}}), ("aligner", {{"landmarks": "aligner"}}),
                 ("int8", {{"recognizer": {str(RECOGNIZER_INT8)!r}}})):
    pipe = FacePipeline(**kw)
    r = pipe.compare({str(obama)!r}, {str(obama2)!r})
    out[name] = {{"same": r.same, "similarity": r.similarity, "providers": pipe.providers}}
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
               FACEKIT_OPENVINO_CACHE=str(tmp_path / "ov-cache"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "onnxruntime" not in out["available"] and out["available"][0] == "openvino", out["available"]
    for name in ("default", "aligner", "int8"):
        assert out[name]["same"] is True, out
        assert all(v.startswith("OpenVINO CPU") for v in out[name]["providers"].values()), out[name]
    assert set(out["aligner"]["providers"]) == {"detector", "recognizer", "aligner"}
    assert out["int8"]["providers"]["recognizer"].startswith("OpenVINO CPU int8")
    ref = FacePipeline(backend="onnxruntime").compare(obama, obama2).similarity
    # auto runs bf16 where the CPU has it natively and the model passed parity (each embedding within cosine
    # BF16_MIN_COSINE of f32, i.e. within distance sqrt(2 (1 - c))): a similarity moves by at most twice that
    bf16 = "bf16" in out["default"]["providers"]["recognizer"]
    assert bf16 == bool(native_bf16()), out["default"]["providers"]
    assert abs(out["default"]["similarity"] - ref) < (2 * math.sqrt(2 * (1 - BF16_MIN_COSINE)) if bf16 else 1e-4)

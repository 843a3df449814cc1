"""`backend="auto"`: the ranking, the fall-through to a backend that really loads, ONNX bytes, hints, and
ONNX Runtime's CUDA probe and thread spinning."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import need
from runtime.backends import base
from runtime.backends.base import Backend, ModelLoadError, available_backends, load_model, load_model_bytes
from runtime.pipeline import DEFAULT_RECOGNIZER

ort = pytest.importorskip("onnxruntime", reason="these tests exercise the ONNX Runtime backend")

from runtime.backends.onnxruntime import (SPINNING_ENV, OnnxRuntimeBackend, cuda_usable, default_spinning,  # noqa: E402
                                          probe_model, session_options)

CUDA_LISTED = "CUDAExecutionProvider" in ort.get_available_providers()


def _has_openvino() -> bool:
    return "openvino" in available_backends()


_REFUSED: list[dict] = []


def _refusing_factory(path, **options) -> Backend:
    """A backend that accepts every ONNX file and then fails to load it (as an engine missing an op would)."""
    _REFUSED.append(options)
    raise ModelLoadError(f"{path}: refuses cannot run this model here")


@pytest.fixture()
def refusing_backend():
    base.register("refuses", 99, lambda: True, lambda p: p.endswith(".onnx"), _refusing_factory, reads_bytes=True,
                  hints=("check_inputs",))
    _REFUSED.clear()
    yield
    del base._REGISTRY["refuses"]


def test_auto_ranks_openvino_first_only_where_bf16_runs_natively_and_cuda_does_not():
    ranked = available_backends()
    assert "onnxruntime" in ranked
    if _has_openvino():
        from runtime.backends.openvino import native_bf16

        openvino_first = bool(native_bf16()) and not cuda_usable()
        assert (ranked.index("openvino") < ranked.index("onnxruntime")) == openvino_first, ranked
    assert base.onnx_backends() == [n for n in ranked if n in ("openvino", "onnxruntime")]


def test_auto_loads_the_first_backend_that_really_runs(refusing_backend):
    model = str(need(DEFAULT_RECOGNIZER))
    loaded = load_model(model, check_inputs=[np.zeros((1, 3, 150, 150), np.float32)], threads=1)
    assert loaded.name == available_backends()[1]  # the refusing one ranks first and gives way
    assert _REFUSED and "check_inputs" in _REFUSED[0]  # it registered the hint: it gets it
    with pytest.raises(ModelLoadError, match="refuses cannot run this model"):
        load_model(model, backend="refuses")


def test_hints_reach_only_backends_that_take_them():
    model = str(need(DEFAULT_RECOGNIZER))
    b = load_model(model, backend="onnxruntime", check_inputs=[np.zeros((1, 3, 150, 150), np.float32)])
    assert isinstance(b, OnnxRuntimeBackend)


def test_onnx_bytes_go_through_the_registry(tmp_path):
    data = need(DEFAULT_RECOGNIZER).read_bytes()
    b = load_model_bytes(data, backend="onnxruntime", label="in-memory recognizer")
    assert b.path == "in-memory recognizer" and b.metadata["task"] == "recognition"
    auto = load_model_bytes(data)
    assert auto.name == base.onnx_backends()[0]
    with pytest.raises(ValueError, match="unknown backend"):
        load_model_bytes(data, backend="nope")
    if "tensorrt" in available_backends():
        with pytest.raises(ModelLoadError, match="cannot load a model from bytes"):
            load_model_bytes(data, backend="tensorrt")


def test_the_cuda_probe_model_runs():
    sess = ort.InferenceSession(probe_model(), providers=["CPUExecutionProvider"])
    x = np.array([2.5], np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x)


def test_auto_device_runs_on_the_cpu_where_cuda_does_not_really_run():
    if cuda_usable():
        pytest.skip("a CUDA GPU really runs ONNX Runtime here")
    model = str(need(DEFAULT_RECOGNIZER))
    assert OnnxRuntimeBackend(model).device == "CPUExecutionProvider"
    with pytest.raises(ModelLoadError, match="CUDA was requested but ONNX Runtime runs on CPUExecutionProvider"):
        OnnxRuntimeBackend(model, device="cuda")


def test_pipeline_with_a_listed_but_unusable_cuda_runs_on_the_cpu(facekit_data):
    """onnxruntime-gpu on a machine without a usable GPU: `FacePipeline(backend="onnxruntime")` still runs."""
    if not CUDA_LISTED or cuda_usable():
        pytest.skip("needs onnxruntime-gpu installed on a machine where CUDA does not really run")
    from runtime.pipeline import FacePipeline

    pipe = FacePipeline(backend="onnxruntime")
    assert pipe.compare(need(facekit_data / "photos" / "obama.jpg"), need(facekit_data / "photos" / "obama2.jpg")).same
    assert set(pipe.providers.values()) == {"CPUExecutionProvider"}


def test_spinning_is_off_by_default_and_configurable(monkeypatch):
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    assert default_spinning() is False
    opts = session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    monkeypatch.setenv(SPINNING_ENV, "1")
    assert default_spinning() is True
    b = OnnxRuntimeBackend(str(need(DEFAULT_RECOGNIZER)), device="cpu", spinning=False)
    assert b.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"

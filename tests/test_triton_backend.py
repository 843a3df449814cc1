"""The triton:// runtime backend without a server: URL parsing, registration for non-file sources, and
tritonclient imported only when such a URL is loaded (the runtime's core install stays small)."""
from __future__ import annotations

import pytest

from conftest import run_python
from runtime.backends import base
from runtime.backends.base import ModelLoadError, load_model
from runtime.backends.triton import TritonURL


def test_urls_parse_or_fail_with_the_expected_form():
    assert TritonURL.parse("triton://127.0.0.1:8001/recognizer") == TritonURL("127.0.0.1", 8001, "recognizer", "")
    assert TritonURL.parse("triton://gpu-box:9001/face_pipeline/3/") == TritonURL("gpu-box", 9001, "face_pipeline", "3")
    assert TritonURL.parse("triton://[::1]:8001/r").address == "[::1]:8001"  # gRPC spelling of IPv6
    for bad in ("triton://host/recognizer", "triton://host:port/r", "triton://h:1/", "triton://h:1/m/v2",
                "http://h:1/m", "triton://h:1/a/1/extra"):
        with pytest.raises(ValueError, match="expected triton://HOST:PORT/MODEL|not a triton:// URL"):
            TritonURL.parse(bad)


def test_urls_route_to_the_triton_backend_and_files_still_must_exist(tmp_path):
    base._discover()
    entry = base._REGISTRY["triton"]
    assert not entry.files and entry.accepts("triton://h:1/m")
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(str(tmp_path / "missing.onnx"))
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model("tritonish://h:1/m")


def test_tritonclient_is_imported_only_for_triton_urls():
    code = ("import sys; from runtime.backends.base import load_model, available_backends; "
            "m = load_model('runtime/models/recognizer.onnx'); available_backends(); "
            "assert 'tritonclient' not in sys.modules, 'tritonclient imported'; "
            "from runtime.pipeline import FacePipeline; FacePipeline().recognizer; "
            "assert 'tritonclient' not in sys.modules and 'grpc' not in sys.modules")
    run_python(code)

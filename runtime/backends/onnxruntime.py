"""ONNX Runtime backend: CPU, and CUDA when onnxruntime-gpu is installed (the provider really used is reported)."""
from __future__ import annotations

import os
import threading

import numpy as np

from ..metadata import METADATA_KEY, ModelMetadataError, decode_metadata
from .base import Backend, ModelLoadError, register

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _ort():
    import onnxruntime

    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX model (path or bytes) with ONNX Runtime.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``; asking for CUDA where it
    does not really run raises instead of silently falling back to the CPU. ``optimize=False`` turns ONNX
    Runtime's graph optimisations off: a Q/DQ graph then runs as written (DequantizeLinear → float op →
    QuantizeLinear) instead of through fused int8 kernels, whose results depend on the CPU.
    """

    name = "onnxruntime"

    def __init__(self, path: str | None = None, *, data: bytes | None = None, device: str = "auto",
                 threads: int = 0, label: str | None = None, optimize: bool = True):
        super().__init__(path or label or "<bytes>")
        ort = _ort()
        source = data if data is not None else path
        if source is None:
            raise ValueError("give a model path or its bytes")
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        if device not in _PROVIDERS:
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(source, sess_options=opts, providers=_PROVIDERS[device])
        except Exception as e:  # ORT raises its own exception types for bad protobufs
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model ({msg})") from None
        active = self.session.get_providers()
        if device == "cuda" and active[0] != "CUDAExecutionProvider":
            raise ModelLoadError(f"{self.path}: CUDA was requested but ONNX Runtime runs on {active[0]}")
        self._device = active[0]
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.raw_metadata = props
        if METADATA_KEY in props:
            try:
                self.metadata = decode_metadata(props, source=self.path)
            except ModelMetadataError as e:
                raise ModelLoadError(str(e)) from None
        self._input = self.session.get_inputs()[0]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._fp16_input = "float16" in self._input.type
        self._lock = threading.Lock() if device == "cuda" else None

    @property
    def device(self) -> str:
        return self._device

    @property
    def input_name(self) -> str:
        return self._input.name

    @property
    def input_shape(self) -> list:
        return list(self._input.shape)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def output_shapes(self) -> list[list]:
        return [list(o.shape) for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float16 if self._fp16_input else np.float32)
        if self._lock is None:  # ORT CPU sessions are safe to call from several threads
            return self.session.run(self._outputs, {self._input.name: x})
        with self._lock:
            return self.session.run(self._outputs, {self._input.name: x})


def _available() -> bool:
    try:
        _ort()
        return True
    except ImportError:
        return False


register(
    "onnxruntime",
    priority=10,
    available=_available,
    accepts=lambda p: os.path.splitext(p)[1].lower() == ".onnx",
    factory=lambda p, **kw: OnnxRuntimeBackend(p, **kw),
)

"""ONNX Runtime backend: CPU, and CUDA when onnxruntime-gpu is installed and a GPU really runs it.

ONNX Runtime lists the providers compiled into the wheel, not the ones that work: onnxruntime-gpu lists CUDA
on a machine without a usable GPU (or without matching CUDA libraries) and then silently builds CPU
sessions. :func:`cuda_usable` therefore builds one tiny probe session on CUDA and checks what it got.

Intra-op threads do not spin after a run by default (``spinning=False``): spinning threads of one session
keep the cores busy while the next model (the detector's, the recognizer's, OpenVINO's) wants them.
``spinning=True`` or ``FACEKIT_ORT_SPINNING=1`` turns it back on (ONNX Runtime's own default).
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np

from ..messages import first_line
from ..optional_imports import importable
from .base import Backend, ModelLoadError, is_onnx_path, register

_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
SPINNING_ENV = "FACEKIT_ORT_SPINNING"


def _ort():
    import onnxruntime

    return onnxruntime


def default_spinning() -> bool:
    """Whether ONNX Runtime's intra-op threads spin after a run: ``$FACEKIT_ORT_SPINNING`` (1/0), default off."""
    return os.environ.get(SPINNING_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX model (path or bytes) with ONNX Runtime.

    ``device``: ``"auto"`` (CUDA where it really runs, else the CPU), ``"cpu"`` or ``"cuda"``; an explicit
    ``"cuda"`` that does not really run raises instead of silently falling back to the CPU. ``threads``:
    intra-op threads (0: one per core). ``spinning``: let idle intra-op threads spin (None: see
    :func:`default_spinning`). ``optimize=False`` turns ONNX Runtime's graph optimisations off: a Q/DQ
    graph then runs as written (DequantizeLinear → float op → QuantizeLinear) instead of through fused
    int8 kernels, whose results depend on the CPU.
    """

    name = "onnxruntime"

    def __init__(self, path: str | None = None, *, data: bytes | None = None, device: str = "auto",
                 threads: int = 0, label: str | None = None, optimize: bool = True, spinning: bool | None = None):
        super().__init__(path or label or "<bytes>")
        ort = _ort()
        source = data if data is not None else path
        if source is None:
            raise ValueError("give a model path or its bytes")
        if device not in ("auto", *_PROVIDERS):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        requested = device
        if device == "auto":
            device = "cuda" if cuda_usable() else "cpu"
        opts = session_options(threads, default_spinning() if spinning is None else spinning)
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(source, sess_options=opts, providers=_PROVIDERS[device])
        except Exception as e:  # ORT raises its own exception types for bad protobufs
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model ({first_line(e)})") from None
        active = self.session.get_providers()
        if requested == "cuda" and active[0] != "CUDAExecutionProvider":
            raise ModelLoadError(f"{self.path}: CUDA was requested but ONNX Runtime runs on {active[0]}")
        self._device = active[0]
        self._keep_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        self._input = self.session.get_inputs()[0]
        outputs = self.session.get_outputs()
        self._set_io(self._input.name, self._input.shape, [o.name for o in outputs], [o.shape for o in outputs])
        self._fp16_input = "float16" in self._input.type
        self._lock = threading.Lock() if self._device == "CUDAExecutionProvider" else None

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float16 if self._fp16_input else np.float32)
        if self._lock is None:  # ORT CPU sessions are safe to call from several threads
            return self.session.run(self._outputs, {self._input.name: x})
        with self._lock:
            return self.session.run(self._outputs, {self._input.name: x})


def session_options(threads: int = 0, spinning: bool = False):
    """ONNX Runtime session options: quiet logs, ``threads`` intra-op threads (0: ORT's default), spinning."""
    opts = _ort().SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    flag = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
    opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return opts


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """Whether a CUDA session really runs here (the wheel lists CUDA and a probe session gets it); cached."""
    try:
        ort = _ort()
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        probe = ort.InferenceSession(probe_model(), sess_options=session_options(1),
                                     providers=_PROVIDERS["cuda"])
    except Exception:
        return False
    return probe.get_providers()[0] == "CUDAExecutionProvider"


def probe_model() -> bytes:
    """A one-node ONNX model (Identity on a float[1] input ``x``), serialised without the onnx package."""
    def field(number: int, payload: bytes) -> bytes:
        return _varint((number << 3) | 2) + _varint(len(payload)) + payload

    def number(field_no: int, value: int) -> bytes:
        return _varint(field_no << 3) + _varint(value)

    def value_info(name: bytes) -> bytes:  # ValueInfoProto{name, type{tensor_type{elem_type FLOAT, shape{dim 1}}}}
        shape = field(2, field(1, number(1, 1)))
        return field(1, name) + field(2, field(1, number(1, 1) + shape))

    node = field(1, b"x") + field(2, b"y") + field(4, b"Identity")
    graph = field(1, node) + field(2, b"probe") + field(11, value_info(b"x")) + field(12, value_info(b"y"))
    return number(1, 8) + field(7, graph) + field(8, number(2, 13))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _priority() -> int:
    """18 where CUDA really runs (above every CPU backend); 10 on the CPU (see the OpenVINO backend's)."""
    return 18 if cuda_usable() else 10


register("onnxruntime", priority=_priority, available=lambda: importable("onnxruntime"), accepts=is_onnx_path,
         factory=lambda p, **kw: OnnxRuntimeBackend(p, **kw), reads_bytes=True)

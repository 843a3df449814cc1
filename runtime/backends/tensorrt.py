"""TensorRT backend: runs serialized engines (``.engine`` / ``.plan``) built by ``export/to_trt.py``.

Every engine has a JSON sidecar (``<engine>.json``) saying what it was built from and for: TensorRT version,
GPU name and compute capability, input shapes (the optimization profile), precision, the SHA-256 of the
source ONNX and of the engine itself, and the facekit metadata copied from the ONNX. An engine is only
loaded when its sidecar is intact and matches this machine; otherwise :class:`ModelLoadError` says why and
how to rebuild. The sidecar logic is pure Python (usable and testable without TensorRT).

Runner: TensorRT 10/11 named I/O tensors (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``)
with cuda-python (``cuda.bindings.runtime``) device buffers and a stream. Never imports torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from typing import Any, Callable

import numpy as np

from ..metadata import ModelMetadataError, decode_metadata, encode_metadata
from ..optional_imports import require_module
from .base import Backend, ModelLoadError, register

ENGINE_EXTENSIONS = (".engine", ".plan")
SIDECAR_FORMAT = "facekit-tensorrt-engine"
SIDECAR_VERSION = 1
#: The fields of a sidecar's ``build`` section: all of them key the engine cache.
BUILD_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "precision", "input_name",
                "profile", "options")
#: One line on how to get TensorRT (NVIDIA's package index).
INSTALL_HINT = ("TensorRT is not installed: pip install tensorrt cuda-python --extra-index-url https://pypi.nvidia.com "
                "(needs an NVIDIA GPU and driver)")


# --------------------------------------------------------------------------------- sidecar (pure Python)


def sidecar_path(engine_path: str | os.PathLike) -> str:
    """Where an engine's sidecar lives: ``<engine>.json``."""
    return os.fspath(engine_path) + ".json"


def engine_key(build: dict[str, Any]) -> str:
    """The cache key of a build: SHA-256 of its canonical JSON (every field of :data:`BUILD_FIELDS`)."""
    missing = [f for f in BUILD_FIELDS if f not in build]
    if missing:
        raise ValueError(f"build description lacks {', '.join(missing)}")
    body = {f: build[f] for f in BUILD_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_sidecar(build: dict[str, Any], engine_bytes: bytes, facekit: dict[str, Any] | None = None,
                 **info: Any) -> dict[str, Any]:
    """The sidecar dict for an engine: ``build`` (the cache key's fields), ``key``, engine hash, metadata."""
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "key": engine_key(build),
        "build": {f: build[f] for f in BUILD_FIELDS},
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "engine_bytes": len(engine_bytes),
        "facekit": facekit or {},
        **info,
    }


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """Load and shape-check an engine's sidecar; :class:`ModelLoadError` when missing or malformed."""
    path = sidecar_path(engine_path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{engine_path}: no sidecar {os.path.basename(path)}; engines must be built with "
                             "`python export/to_trt.py MODEL.onnx` so their origin can be checked")
    try:
        with open(path, encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable sidecar ({e})") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT or not isinstance(side.get("build"), dict):
        raise ModelLoadError(f"{path}: not a facekit TensorRT sidecar")
    return side


def _fmt(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def build_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Human-readable differences between two build descriptions (empty when they key the same engine)."""
    out = []
    for f in BUILD_FIELDS:
        if have.get(f) != want.get(f):
            out.append(f"{f}: engine has {_fmt(have.get(f))}, wanted {_fmt(want.get(f))}")
    return out


def sidecar_problems(sidecar: dict[str, Any], environment: dict[str, Any] | None = None,
                     engine_bytes: bytes | None = None) -> list[str]:
    """Why an engine must not be used here (empty list: fine).

    Checks the sidecar's integrity (format version, key recomputed from its build fields), that it belongs
    to ``engine_bytes`` (SHA-256), and that ``environment`` (TensorRT version, GPU name, compute
    capability of this machine) is the one the engine was built for.
    """
    problems = []
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > SIDECAR_VERSION:
        return [f"sidecar format version {version!r} is not supported (this runtime reads ≤ {SIDECAR_VERSION})"]
    build = sidecar.get("build", {})
    try:
        key = engine_key(build)
    except ValueError as e:
        return [f"sidecar: {e}"]
    if key != sidecar.get("key"):
        problems.append("sidecar key does not match its build fields (edited or damaged sidecar)")
    if engine_bytes is not None:
        digest = hashlib.sha256(engine_bytes).hexdigest()
        if digest != sidecar.get("engine_sha256"):
            problems.append("engine file does not match its sidecar (engine replaced or truncated)")
    if environment is not None:
        for f in ("tensorrt_version", "compute_capability", "gpu_name"):
            if f in environment and environment[f] != build.get(f):
                problems.append(f"built for {f.replace('_', ' ')} {build.get(f)!r}, this machine has {environment[f]!r}")
    return problems


# ----------------------------------------------------------------------------------- TensorRT + CUDA


def import_tensorrt(error: Callable[[str], Exception] = ModelLoadError):
    """The ``tensorrt`` module, or ``error`` (default :class:`ModelLoadError`) with :data:`INSTALL_HINT`."""
    return require_module("tensorrt", error, INSTALL_HINT)


def import_cudart():
    """cuda-python's runtime API (``cuda.bindings.runtime``, or the older ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise ModelLoadError("cuda-python is not installed: pip install cuda-python") from None
    return cudart


def cuda_check(result):
    """Unpack a cuda-python call result ``(err, *values)``; raise on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        cudart = import_cudart()
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise RuntimeError(f"CUDA error {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_environment(device: int = 0) -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of ``device`` on this machine."""
    trt = import_tensorrt()
    cudart = import_cudart()
    try:
        count = cuda_check(cudart.cudaGetDeviceCount())
        if count <= device:
            raise ModelLoadError(f"no CUDA device {device} (found {count})")
        prop = cuda_check(cudart.cudaGetDeviceProperties(device))
    except RuntimeError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"TensorRT needs a working CUDA GPU: {e}") from None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, (bytes, bytearray)) else str(prop.name)
    return {"tensorrt_version": trt.__version__, "gpu_name": name.split("\x00")[0].strip(),
            "compute_capability": f"{prop.major}.{prop.minor}"}


def _device_index(device: Any) -> int:
    if device in (None, "auto", "cuda"):
        return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str) and device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise ValueError(f"TensorRT runs on CUDA devices; device must be 'auto', 'cuda', 'cuda:N' or an int, got {device!r}")


def _dims(shape) -> list:
    """An engine tensor's dimensions as the Backend interface spells them ("batch" for a dynamic axis)."""
    return ["batch" if d < 0 else int(d) for d in shape]


class TensorRTBackend(Backend):
    """A TensorRT engine with its checked sidecar; ``run`` splits batches larger than the profile's max."""

    name = "tensorrt"

    def __init__(self, path: str, *, device: Any = "auto", **_ignored: Any):
        super().__init__(path)
        self._device_id = _device_index(device)
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self.sidecar = read_sidecar(path)
        with open(path, "rb") as f:
            data = f.read()
        env = current_environment(self._device_id)
        problems = sidecar_problems(self.sidecar, env, data)
        if problems:
            raise ModelLoadError(f"{path}: cannot use this engine here: " + "; ".join(problems)
                                 + ". Rebuild it: python export/to_trt.py SOURCE.onnx --out " + path)
        try:
            meta = self.sidecar.get("facekit") or {}
            self.raw_metadata = encode_metadata(meta) if meta else {}
            self.metadata = decode_metadata(self.raw_metadata, source=path) if meta else {}
        except ModelMetadataError as e:
            raise ModelLoadError(str(e)) from None
        cuda_check(cudart.cudaSetDevice(self._device_id))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ModelLoadError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ModelLoadError(f"{path}: expected one input tensor, found {inputs}")
        self._input = inputs[0]
        outputs = [n for n in names if n not in inputs]
        self._set_io(self._input, _dims(self.engine.get_tensor_shape(self._input)), outputs,
                     [_dims(self.engine.get_tensor_shape(n)) for n in outputs])
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        profile = self.engine.get_tensor_profile_shape(self._input, 0)
        self._min_batch, self._max_batch = int(profile[0][0]), int(profile[2][0])
        self._stream = cuda_check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, bytes)
        self._lock = threading.Lock()
        build = self.sidecar["build"]
        self._device = f"TensorRT {build['tensorrt_version']} on {build['gpu_name']} ({build['precision']})"

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile."""
        return self._min_batch, self._max_batch

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self._cudart.cudaFree(ptr))
            ptr = cuda_check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run_chunk(self, x: np.ndarray) -> list[np.ndarray]:
        cudart, ctx = self._cudart, self.context
        stream = self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if not ctx.set_input_shape(self._input, tuple(x.shape)):
            raise ValueError(f"{self.path}: input shape {x.shape} is outside the engine's profile")
        ptr = self._buffer(self._input, x.nbytes)
        cuda_check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, stream))
        ctx.set_tensor_address(self._input, ptr)
        outs = []
        for name in self._outputs:
            out = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtypes[name])
            ctx.set_tensor_address(name, self._buffer(name, max(out.nbytes, 1)))
            outs.append(out)
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError(f"{self.path}: TensorRT execution failed")
        for name, out in zip(self._outputs, outs):
            cuda_check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, stream))
        cuda_check(cudart.cudaStreamSynchronize(stream))
        return [o.astype(np.float32) if o.dtype == np.float16 else o for o in outs]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self._dtypes[self._input])
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"expected a non-empty batch, got shape {x.shape}")
        with self._lock:
            cuda_check(self._cudart.cudaSetDevice(self._device_id))
            parts = [self._run_chunk(np.ascontiguousarray(x[i:i + self._max_batch]))
                     for i in range(0, len(x), self._max_batch)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self._outputs))]

    def close(self) -> None:
        """Free the device buffers and the stream (also done at garbage collection)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _available() -> bool:
    try:
        has_cuda = importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None
    except (ImportError, ValueError):
        has_cuda = False
    return importlib.util.find_spec("tensorrt") is not None and has_cuda


register(
    "tensorrt",
    priority=20,  # above ONNX Runtime (10): on a machine with TensorRT, engines are the fast path
    available=_available,
    accepts=lambda p: os.path.splitext(p)[1].lower() in ENGINE_EXTENSIONS,
    factory=lambda p, **kw: TensorRTBackend(p, **kw),
)

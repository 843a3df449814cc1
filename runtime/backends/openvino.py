"""OpenVINO backend: ONNX models (files or bytes) on the CPU in f32, bf16 or int8.

Precision (``precision=``): ``"f32"``; ``"bf16"`` where the CPU computes bf16 natively (AMX or AVX512-BF16;
elsewhere OpenVINO would quietly run f32, so it is refused); ``"int8"`` for INT8 Q/DQ models (facekit's
``*_int8.onnx``), run through OpenVINO's int8 kernels; ``"auto"``: int8 for a Q/DQ model, else bf16 only
where the CPU has native bf16 **and** the model passes a parity check against f32 (min cosine ≥
:data:`BF16_MIN_COSINE` over real inputs: aligned crops of the runtime's sample face for a recognizer, the
caller's ``check_inputs`` for other models), else f32. The verdict is kept beside OpenVINO's compiled-model
cache (``CACHE_DIR``), so later start-ups neither re-check nor recompile.

One compiled model serves all threads: each :meth:`run` borrows an infer request from a small pool (as many
as OpenVINO's optimal number of requests; more could not run at once) and returns it after copying the
outputs. All OpenVINO models of a process share one thread pool, so the detector, the aligner and the
recognizer take turns on the cores instead of fighting over them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..cpu import cpu_model, first_isa
from ..files import atomic_write_bytes, cache_dir as facekit_cache_dir, sha256_file
from ..metadata import ModelMetadataError, check_warp, preprocess_spec, read_onnx_metadata
from ..messages import first_line
from ..optional_imports import importable
from .base import Backend, ModelLoadError, is_onnx_path, pad_rows, register

PRECISIONS = ("auto", "f32", "bf16", "int8")
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
#: The smallest cosine (per output row, against f32) at which ``precision="auto"`` accepts bf16.
BF16_MIN_COSINE = 0.9999
#: OpenVINO's compiled-model cache folder; empty or ``off`` disables it. Default ``<facekit cache>/openvino``.
CACHE_ENV = "FACEKIT_OPENVINO_CACHE"

CheckInputs = Sequence[np.ndarray] | Callable[[Backend], Sequence[np.ndarray]]


def _ov():
    import openvino

    return openvino


@functools.lru_cache(maxsize=1)
def core():
    """The process's one ``openvino.Core`` (its CPU plugin and thread pool are shared by all models)."""
    return _ov().Core()


def is_bf16(precision) -> bool:
    """Whether an ``INFERENCE_PRECISION_HINT`` value (an ``openvino.Type``, printed ``<Type: 'bfloat16'>``,
    or its name) is bf16."""
    return getattr(precision, "get_type_name", lambda: str(precision))() == "bf16"


@functools.lru_cache(maxsize=1)
def native_bf16() -> str | None:
    """The instruction set that computes bf16 natively here ("AMX", "AVX512-BF16"), None when there is none.

    OpenVINO's CPU plugin says whether it has a bf16 path (``BF16`` in ``OPTIMIZATION_CAPABILITIES``); the
    CPU flags name it."""
    if "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None
    return _shown(first_isa(("AMX-BF16", "AVX512-BF16"))) or "native bf16"


def int8_isa() -> str | None:
    """The int8 dot-product instructions here ("AMX", "VNNI"), None without them (int8 then runs slower)."""
    return _shown(first_isa(("AMX-INT8", "VNNI")))


def _shown(isa: str | None) -> str | None:
    """An instruction set as devices and reports name it: AMX's bf16 and int8 parts as "AMX"."""
    return "AMX" if isa in ("AMX-BF16", "AMX-INT8") else isa


def default_cache_dir() -> Path | None:
    """Where compiled models and precision verdicts are kept: ``$FACEKIT_OPENVINO_CACHE``, else
    ``<facekit cache>/openvino``; None when the variable is empty or ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return facekit_cache_dir() / "openvino"
    return None if value.strip().lower() in ("", "0", "off", "none") else Path(value)


class OpenVinoBackend(Backend):
    """Runs an ONNX model (path or bytes) with OpenVINO on the CPU.

    ``precision``: see the module docstring. ``threads``: ``INFERENCE_NUM_THREADS`` (0: OpenVINO's choice,
    one per core). ``hint``: ``"latency"`` (one stream over all cores; the pipeline's case) or
    ``"throughput"`` (several streams, for many concurrent callers). ``streams``: ``NUM_STREAMS`` (0: the
    hint's choice). ``pinning``: pin OpenVINO's threads to cores (``ENABLE_CPU_PINNING``; off by default:
    pinned threads cannot move away from cores that other threads or processes are using). ``cache_dir``: compiled-model cache (None: :func:`default_cache_dir`; False: none).
    ``check_inputs``: model inputs (or a function of the loaded f32 backend returning them) for the bf16
    parity check of models that are not facekit recognizers.
    """

    name = "openvino"

    def __init__(self, path: str | None = None, *, data: bytes | None = None, label: str | None = None,
                 precision: str = "auto", device: str = "auto", threads: int = 0, hint: str = "latency",
                 streams: int = 0, pinning: bool = False, cache_dir: str | os.PathLike | None | bool = None,
                 check_inputs: CheckInputs | None = None):
        super().__init__(path or label or "<bytes>")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {tuple(HINTS)}, got {hint!r}")
        if device not in ("auto", "cpu"):
            raise ModelLoadError(f"{self.path}: the OpenVINO backend runs on the CPU; device {device!r} is not one")
        if (data is None) == (path is None):
            raise ValueError("give a model path or its bytes")
        self._source: str | bytes = bytes(data) if data is not None else os.fspath(path)
        self._read_metadata()
        self._config = {"PERFORMANCE_HINT": HINTS[hint], "ENABLE_CPU_PINNING": bool(pinning)}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        if streams:
            self._config["NUM_STREAMS"] = int(streams)
        self._cache = _resolve_cache(cache_dir)
        if self._cache is not None:
            self._config["CACHE_DIR"] = str(self._cache)
        self._model = None  # the ov.Model, read only when needed (bytes, graph inspection)
        self.precision, self.precision_reason = self._resolve(precision, check_inputs)

    # ------------------------------------------------------------------------------------ loading

    def _read_metadata(self) -> None:
        try:
            raw = read_onnx_metadata(self._source)
        except ModelMetadataError as e:
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model ({str(e).split(': ', 1)[-1]})") from None
        self._keep_metadata(raw)

    def _ov_model(self):
        if self._model is None:
            try:
                self._model = core().read_model(self._source)
            except Exception as e:
                raise ModelLoadError(f"{self.path}: not a loadable ONNX model (OpenVINO: {first_line(e)})") from None
        return self._model

    def _quantized(self) -> bool:
        """Whether the model is an INT8 Q/DQ graph (facekit metadata says so, else its ops do)."""
        if "precision" in self.metadata:
            return self.metadata["precision"] == "int8"
        return any(op.get_type_name() == "FakeQuantize" for op in self._ov_model().get_ops())

    def _compile(self, precision: str):
        """Compile for ``precision`` and make this backend run it."""
        config = dict(self._config, INFERENCE_PRECISION_HINT="bf16" if precision == "bf16" else "f32")
        source = self._source if isinstance(self._source, str) and self._model is None else self._ov_model()
        try:
            compiled = core().compile_model(source, "CPU", config)
        except Exception as e:
            if "CACHE_DIR" in config and _cache_failure(e):
                warnings.warn(f"OpenVINO cache {config['CACHE_DIR']} unusable ({first_line(e)}); compiling without it")
                self._config.pop("CACHE_DIR")
                self._cache = None
                return self._compile(precision)
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model (OpenVINO: {first_line(e)})") from None
        self._use(compiled)
        return compiled

    def _use(self, compiled) -> None:
        self.compiled = compiled
        self._inputs = compiled.inputs
        if len(self._inputs) != 1:
            raise ModelLoadError(f"{self.path}: facekit runs models with one input; this one has {len(self._inputs)}")
        self._input_dtype = self._inputs[0].get_element_type().to_dtype()
        outputs = compiled.outputs
        names = self._port_names([*self._inputs, *outputs])
        self._set_io(names[0], _dims(self._inputs[0].get_partial_shape()),
                     names[1:], [_dims(o.get_partial_shape()) for o in outputs])
        self._pool = _RequestPool(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._runs_bf16 = is_bf16(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def _port_names(self, ports) -> list[str]:
        """The ONNX names of compiled ``ports`` (input, then outputs). Compiling can merge a tensor's names
        with those of the Casts beside it (fp16 models), so the model as read names them then."""
        if all(len(p.get_names()) == 1 for p in ports):
            return [p.get_any_name() for p in ports]
        model = self._ov_model()
        return [p.get_any_name() for p in (*model.inputs, *model.outputs)]

    def _resolve(self, precision: str, check_inputs: CheckInputs | None) -> tuple[str, str]:
        """Pick the precision, compile it; returns (precision, why)."""
        quantized = self._quantized()
        if precision == "int8" or (quantized and precision == "auto"):
            if not quantized:
                raise ModelLoadError(f"{self.path}: precision 'int8' needs an INT8 Q/DQ model "
                                     "(export/to_onnx.py --int8); this one is not quantized")
            self._compile("f32")
            return "int8", "requested" if precision == "int8" else "auto: INT8 Q/DQ model"
        if quantized:
            raise ModelLoadError(f"{self.path}: an INT8 Q/DQ model runs at precision 'int8' (or 'auto'), "
                                 f"not {precision!r}; load the fp32 model for f32/bf16")
        isa = native_bf16()
        if precision == "bf16":
            if isa is None:
                raise ModelLoadError(f"{self.path}: precision 'bf16' needs a CPU with native bf16 (AMX or "
                                     f"AVX512-BF16); {cpu_model()} has none (use 'f32' or 'auto')")
            self._compile("bf16")
            return "bf16", "requested"
        if precision == "f32":
            self._compile("f32")
            return "f32", "requested"
        if isa is None:
            self._compile("f32")
            return "f32", f"auto: no native bf16 on {cpu_model()}"
        return self._auto_bf16(check_inputs)

    def _auto_bf16(self, check_inputs: CheckInputs | None) -> tuple[str, str]:
        """On a CPU with native bf16: bf16 if it passes the parity check against f32 (verdict cached)."""
        self._compile("f32")
        inputs = self._check_inputs(check_inputs)
        if not inputs:
            return "f32", "auto: bf16 not verified (no parity inputs for a model without facekit recognizer metadata)"
        verdict = bf16_verdict(self, inputs, self._cache)
        if verdict["min_cosine"] >= BF16_MIN_COSINE:
            self._compile("bf16")
            return "bf16", (f"auto: bf16 passed parity (min cos {verdict['min_cosine']:.6f} ≥ {BF16_MIN_COSINE} "
                            f"on {verdict['inputs']} inputs)")
        return "f32", f"auto: bf16 failed parity (min cos {verdict['min_cosine']:.6f} < {BF16_MIN_COSINE})"

    def _check_inputs(self, check_inputs: CheckInputs | None) -> list[np.ndarray]:
        """The parity inputs, cut into the model's batch when it is fixed (the last one padded)."""
        inputs, b = self._given_check_inputs(check_inputs), self.fixed_batch
        return [pad_rows(x[i:i + b], b) for x in inputs for i in range(0, len(x), b)] if b else inputs

    def _given_check_inputs(self, check_inputs: CheckInputs | None) -> list[np.ndarray]:
        if check_inputs is not None:
            inputs = check_inputs(self) if callable(check_inputs) else check_inputs
            return [np.asarray(x, np.float32) for x in inputs]
        if self.metadata.get("task") == "recognition":
            from ..preprocess import to_model_input
            from ..sample_face import sample_crops

            spec = preprocess_spec(self.metadata)
            check_warp(spec, self.path)
            return [to_model_input(sample_crops(spec), spec, color_order="BGR")]
        return []

    def model_hash(self) -> str:
        """sha256 of the model's bytes."""
        if isinstance(self._source, bytes):
            return hashlib.sha256(self._source).hexdigest()
        return sha256_file(self._source)

    # ------------------------------------------------------------------------------------ interface

    @property
    def device(self) -> str:
        if self.precision == "bf16":
            return f"OpenVINO CPU bf16 ({native_bf16()})"
        if self.precision == "int8":
            isa = int8_isa()
            return f"OpenVINO CPU int8 ({isa})" if isa else "OpenVINO CPU int8"
        return "OpenVINO CPU f32"

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self._input_dtype)
        return self._pool.infer(x)


class _RequestPool:
    """Infer requests of one compiled model, lent to one caller at a time (at most ``size`` exist)."""

    def __init__(self, compiled, size: int):
        self._compiled = compiled
        self._size = max(1, size)
        self._idle: list = []
        self._created = 0
        self._free = threading.Condition()

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        request = self._borrow()
        try:
            return list(request.infer({0: x}, share_inputs=True).to_tuple())  # outputs are copies
        finally:
            with self._free:
                self._idle.append(request)
                self._free.notify()

    def _borrow(self):
        with self._free:
            while not self._idle and self._created >= self._size:
                self._free.wait()
            if self._idle:
                return self._idle.pop()
            self._created += 1
        return self._compiled.create_infer_request()


def verdict_file(backend: OpenVinoBackend, inputs: list[np.ndarray], cache: Path) -> Path:
    """The file in ``cache`` that keeps the bf16 verdict for this model, these inputs, this CPU and OpenVINO."""
    digest = hashlib.sha256()
    for part in (backend.model_hash(), cpu_model(), str(native_bf16()), _ov().__version__):
        digest.update(part.encode())
    for x in inputs:
        digest.update(np.ascontiguousarray(x, np.float32).tobytes())
    return Path(cache) / f"facekit-bf16-{digest.hexdigest()[:24]}.json"


def bf16_verdict(backend: OpenVinoBackend, inputs: list[np.ndarray], cache: Path | None) -> dict:
    """Min cosine (per output row) of ``backend``'s model in bf16 against f32 on ``inputs``; read from its
    :func:`verdict_file` when one was kept, else measured (compiling bf16) and kept there."""
    record = verdict_file(backend, inputs, cache) if cache is not None else None
    if record is not None and record.is_file():
        try:
            return json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    reference = [backend.run(x) for x in inputs]
    compiled = backend._compile("bf16")
    if not backend._runs_bf16:
        raise ModelLoadError(f"{backend.path}: OpenVINO compiled the bf16 build as {compiled.get_property('INFERENCE_PRECISION_HINT')}")
    reduced = [backend.run(x) for x in inputs]
    backend._compile("f32")
    verdict = {"min_cosine": min_row_cosine(reference, reduced), "inputs": int(sum(len(x) for x in inputs)),
               "threshold": BF16_MIN_COSINE, "model": os.path.basename(backend.path), "cpu": cpu_model(),
               "isa": native_bf16(), "openvino": _ov().__version__}
    if record is not None:
        try:
            atomic_write_bytes(record, json.dumps(verdict, indent=1).encode())
        except OSError as e:
            warnings.warn(f"could not keep the bf16 verdict in {record}: {e}")
    return verdict


def min_row_cosine(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    """Smallest cosine between matching rows (first axis) of matching outputs of two runs; a row holding a
    NaN or an infinity counts as −1 (an overflowing reduced-precision build must not pass)."""
    worst = 1.0
    for ref_outs, outs in zip(reference, other):
        for a, b in zip(ref_outs, outs):
            a = np.asarray(a, np.float64).reshape(len(a), -1)
            b = np.asarray(b, np.float64).reshape(len(b), -1)
            with np.errstate(invalid="ignore", over="ignore"):
                norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300),
                               np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))
            finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
            worst = min(worst, float(np.where(finite, cos, -1.0).min()))
    return worst


def _resolve_cache(cache_dir) -> Path | None:
    if cache_dir is False or cache_dir == "":
        return None
    folder = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"OpenVINO cache {folder} cannot be created ({e}); compiling without a cache")
        return None
    return folder


def _cache_failure(e: Exception) -> bool:
    text = str(e).lower()
    return "cache" in text or "permission" in text


def _dims(shape) -> list:
    return [d.get_length() if d.is_static else None for d in shape]


def _available() -> bool:
    if not importable("openvino"):
        return False
    try:
        return "CPU" in core().available_devices
    except Exception:
        return False


def _priority() -> int:
    """Above ONNX Runtime on the CPU (10) where bf16 runs natively (OpenVINO's bf16 path is the fast one);
    below it elsewhere, where both run f32 at about the same speed and ONNX Runtime is the reference; below
    ONNX Runtime on a working CUDA GPU (18) always."""
    return 15 if _available() and native_bf16() else 5


register(
    "openvino",
    priority=_priority,
    available=_available,
    accepts=is_onnx_path,
    factory=lambda p, **kw: OpenVinoBackend(p, **kw),
    reads_bytes=True,
    hints=("check_inputs",),
)

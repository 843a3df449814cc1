"""The one small interface every inference backend implements, and the registry that picks one.

A backend module in this package calls :func:`register` at import time; :func:`load_model` (a file, or for
backends registered with ``files=False`` a source such as a server URL) and :func:`load_model_bytes` (ONNX
in memory) pick the fastest available backend that accepts the model and really loads it here. Adding a
backend means adding one module here.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..metadata import METADATA_KEY, ModelMetadataError, decode_metadata


class ModelLoadError(RuntimeError):
    """A model file could not be loaded (missing, truncated, foreign, or built for another machine)."""


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    """``batch`` with copies of its last row appended up to ``rows`` rows: a fixed-batch model's short batch."""
    missing = rows - len(batch)
    return np.concatenate([batch, np.repeat(batch[-1:], missing, axis=0)]) if missing > 0 else batch


class Backend(abc.ABC):
    """A loaded model that maps one float32 input batch to its outputs."""

    #: backend name ("onnxruntime", "tensorrt", ...)
    name: str = ""

    def __init__(self, path: str):
        self.path = path
        #: the decoded facekit metadata (:func:`runtime.metadata.decode_metadata`), ``{}`` when absent
        self.metadata: dict = {}
        #: every metadata entry the model file carries, key → string (facekit's and foreign ones)
        self.raw_metadata: dict[str, str] = {}

    def _keep_metadata(self, raw: dict[str, str]) -> None:
        """Keep the model's metadata entries and decode facekit's, when present (invalid: ModelLoadError)."""
        self.raw_metadata = dict(raw)
        if METADATA_KEY in self.raw_metadata:
            try:
                self.metadata = decode_metadata(self.raw_metadata, source=self.path)
            except ModelMetadataError as e:
                raise ModelLoadError(str(e)) from None

    #: set by subclasses when the model is loaded: what runs it (:attr:`device`), and through :meth:`_set_io`
    #: its one input and its outputs
    _device: str = ""
    _input_name: str = ""
    _input_shape: list | tuple = ()
    _outputs: list[str] | tuple = ()
    _output_shapes: list[list] | tuple = ()

    def _set_io(self, input_name: str, input_shape: list, output_names: list[str], output_shapes: list[list]) -> None:
        """Record the model's input and outputs as the interface reports them."""
        self._input_name = input_name
        self._input_shape = list(input_shape)
        self._outputs = list(output_names)
        self._output_shapes = [list(s) for s in output_shapes]

    @property
    def device(self) -> str:
        """What really runs the model, e.g. ``"CPUExecutionProvider"`` or ``"TensorRT 10.x on NVIDIA H100"``."""
        return self._device

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def input_shape(self) -> list:
        """The input's dimensions: an int for a fixed axis, a name (str) or None for a dynamic one."""
        return list(self._input_shape)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def output_shapes(self) -> list[list]:
        """Each output's dimensions, in ``output_names`` order (dynamic axes as in :attr:`input_shape`)."""
        return [list(s) for s in self._output_shapes]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with when its batch axis is fixed, else None."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    @property
    def max_batch(self) -> int | None:
        """The largest batch one :meth:`run` call accepts in one piece (None: no limit)."""
        return self.fixed_batch

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one batch (float32, the model's layout); return every output as a numpy array."""

    def run_batched(self, rows: np.ndarray, batch_size: int,
                    prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The first output (float32, one entry per input row) of ``rows`` run ``batch_size`` at a time, each
        chunk through ``prepare`` first (e.g. preprocessing). A fixed-batch model runs its own batch size; its
        last chunk is padded with copies of the chunk's last row, whose outputs are dropped."""
        if len(rows) == 0:
            raise ValueError("run_batched needs at least one row")
        fixed = self.fixed_batch
        step = fixed or max(1, int(batch_size))
        out = []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            if prepare is not None:
                chunk = prepare(chunk)
            n = len(chunk)
            out.append(np.asarray(self.run(pad_rows(chunk, fixed) if fixed else chunk)[0], np.float32)[:n])
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.path.basename(self.path)!r}, device={self.device!r})"


#: Load options that only some backends use (e.g. inputs to verify a reduced-precision build against full
#: precision); any caller may pass them, and a backend that did not register one never sees it.
HINTS = ("check_inputs",)


@dataclass(frozen=True)
class _Entry:
    priority: int | Callable[[], int]
    available: Callable[[], bool]
    accepts: Callable[[str], bool]
    factory: Callable[..., Backend]
    reads_bytes: bool
    hints: tuple[str, ...]
    files: bool

    def rank(self) -> int:
        return self.priority() if callable(self.priority) else self.priority

    def build(self, path: str | None, options: dict) -> Backend:
        kept = {k: v for k, v in options.items() if k not in HINTS or k in self.hints}
        return self.factory(path, **kept)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, priority: int | Callable[[], int], available: Callable[[], bool],
             accepts: Callable[[str], bool], factory: Callable[..., Backend], *, reads_bytes: bool = False,
             hints: tuple[str, ...] = (), files: bool = True) -> None:
    """Register a backend. Higher ``priority`` (a number, or a function evaluated when backends are ranked)
    wins under ``backend="auto"``. ``factory(path, **options)``; with ``reads_bytes`` the factory also takes
    ``factory(None, data=ONNX_BYTES, label=NAME, **options)``. ``hints``: the :data:`HINTS` it uses. ``files=False``: the backend loads sources that are not files
    (``accepts`` recognises them, e.g. by URL scheme)."""
    _REGISTRY[name] = _Entry(priority, available, accepts, factory, reads_bytes, tuple(hints), files)


def available_backends() -> list[str]:
    """Names of the backends usable in this environment, fastest first."""
    _discover()
    ranked = sorted(_REGISTRY.items(), key=lambda kv: -kv[1].rank())
    return [n for n, e in ranked if e.available()]


def is_onnx_path(path: str) -> bool:
    """Whether ``path`` names an ONNX file (by its extension)."""
    return os.path.splitext(path)[1].lower() == ".onnx"


def onnx_backends() -> list[str]:
    """Names of the available backends that load ONNX models (files and bytes), fastest first."""
    return [n for n in available_backends() if _REGISTRY[n].reads_bytes]


def load_model(path: str, backend: str = "auto", **options) -> Backend:
    """Load ``path`` (a model file, or a source such as ``triton://host:port/model``) with the named backend,
    or under ``"auto"`` with the fastest available one that accepts it and really loads it here (a backend
    that fails to load it gives way to the next)."""
    _discover()
    if not os.path.isfile(path) and not any(not e.files and e.accepts(path) for e in _REGISTRY.values()):
        raise ModelLoadError(f"{path}: model file not found")
    if backend != "auto":
        entry = _named(backend)
        if not entry.accepts(path):
            raise ModelLoadError(f"{path}: backend {backend!r} cannot load this kind of file")
        return entry.build(path, options)
    candidates = [_REGISTRY[n] for n in available_backends() if _REGISTRY[n].accepts(path)]
    if not candidates:
        missing = [n for n, e in _REGISTRY.items() if e.accepts(path) and not e.available()]
        hint = f"; backend {missing[0]!r} accepts it but is not installed here" if missing else ""
        raise ModelLoadError(f"{path}: no available backend accepts this file "
                             f"(available: {available_backends()}){hint}")
    return _first_that_loads(candidates, lambda e: e.build(path, options))


def load_model_bytes(data: bytes, backend: str = "auto", label: str = "<bytes>", **options) -> Backend:
    """Load an ONNX model held in memory (``label`` names it in messages and ``Backend.path``)."""
    _discover()
    if backend != "auto":
        entry = _named(backend)
        if not entry.reads_bytes:
            raise ModelLoadError(f"{label}: backend {backend!r} cannot load a model from bytes; "
                                 f"use one of {[n for n, e in _REGISTRY.items() if e.reads_bytes]} or a file path")
        return entry.build(None, {**options, "data": bytes(data), "label": label})
    candidates = [_REGISTRY[n] for n in available_backends() if _REGISTRY[n].reads_bytes]
    if not candidates:
        raise ModelLoadError(f"{label}: no available backend loads ONNX bytes (available: {available_backends()})")
    return _first_that_loads(candidates, lambda e: e.build(None, {**options, "data": bytes(data), "label": label}))


def _named(backend: str) -> _Entry:
    if backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; known: {sorted(_REGISTRY)}")
    entry = _REGISTRY[backend]
    if not entry.available():
        raise ModelLoadError(f"backend {backend!r} is not installed here; available: {available_backends()}")
    return entry


def _first_that_loads(candidates: list[_Entry], build: Callable[[_Entry], Backend]) -> Backend:
    """The first candidate's backend that loads; the first candidate's error when none does."""
    first: ModelLoadError | None = None
    for entry in candidates:
        try:
            return build(entry)
        except ModelLoadError as e:
            first = first or e
    raise first


def _discover() -> None:
    """Import every backend module of this package once (each registers itself)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if mod.name != "base":
            importlib.import_module(f"{__package__}.{mod.name}")

"""The one small interface every inference backend implements, and the registry that picks one.

A backend module in this package calls :func:`register` at import time; :func:`load_model` picks the
first available backend that accepts the file (or, for backends registered with ``files=False``, the
source such as a server URL). Adding a backend means adding one module here.
"""
from __future__ import annotations

import abc
import os
from typing import Callable

import numpy as np


class ModelLoadError(RuntimeError):
    """A model file could not be loaded (missing, truncated, foreign, or built for another machine)."""


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

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """What really runs the model, e.g. ``"CPUExecutionProvider"`` or ``"TensorRT 10.x on NVIDIA H100"``."""

    @property
    @abc.abstractmethod
    def input_name(self) -> str: ...

    @property
    @abc.abstractmethod
    def input_shape(self) -> list:
        """The input's dimensions: an int for a fixed axis, a name (str) or None for a dynamic one."""

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def output_shapes(self) -> list[list]:
        """Each output's dimensions, in ``output_names`` order (dynamic axes as in :attr:`input_shape`)."""

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.path.basename(self.path)!r}, device={self.device!r})"


# name -> (priority, is_available, accepts(path), factory(path, **options))
_REGISTRY: dict[str, tuple[int, Callable[[], bool], Callable[[str], bool], Callable[..., Backend]]] = {}
#: backends whose sources are not files (e.g. ``triton://`` URLs): load_model does not require a file for them
_NON_FILE: set[str] = set()


def register(name: str, priority: int, available: Callable[[], bool], accepts: Callable[[str], bool],
             factory: Callable[..., Backend], *, files: bool = True) -> None:
    """Register a backend. Higher ``priority`` wins under ``backend="auto"``; ``files=False``: the backend
    loads sources that are not files (``accepts`` recognises them, e.g. by URL scheme)."""
    _REGISTRY[name] = (priority, available, accepts, factory)
    if files:
        _NON_FILE.discard(name)
    else:
        _NON_FILE.add(name)


def available_backends() -> list[str]:
    """Names of the backends usable in this environment, fastest first."""
    _discover()
    ranked = sorted(_REGISTRY.items(), key=lambda kv: -kv[1][0])
    return [n for n, (_, ok, _, _) in ranked if ok()]


def load_model(path: str, backend: str = "auto", **options) -> Backend:
    """Load ``path`` (a model file, or a source such as ``triton://host:port/model``) with the named backend,
    or with the fastest available one that accepts it."""
    _discover()
    if not os.path.isfile(path) and not any(_REGISTRY[n][2](path) for n in _NON_FILE):
        raise ModelLoadError(f"{path}: model file not found")
    if backend != "auto":
        if backend not in _REGISTRY:
            raise ValueError(f"unknown backend {backend!r}; known: {sorted(_REGISTRY)}")
        _, ok, accepts, factory = _REGISTRY[backend]
        if not ok():
            raise ModelLoadError(f"backend {backend!r} is not installed here; available: {available_backends()}")
        if not accepts(path):
            raise ModelLoadError(f"{path}: backend {backend!r} cannot load this kind of file")
        return factory(path, **options)
    for name in available_backends():
        _, _, accepts, factory = _REGISTRY[name]
        if accepts(path):
            return factory(path, **options)
    missing = [n for n, (_, ok, accepts, _) in _REGISTRY.items() if accepts(path) and not ok()]
    hint = f"; backend {missing[0]!r} accepts it but is not installed here" if missing else ""
    raise ModelLoadError(f"{path}: no available backend accepts this file (available: {available_backends()}){hint}")


def _discover() -> None:
    """Import every backend module of this package once (each registers itself)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules([os.path.dirname(__file__)]):
        if mod.name != "base":
            importlib.import_module(f"{__package__}.{mod.name}")

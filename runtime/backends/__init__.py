"""Inference backends behind one interface (:class:`Backend`); see :mod:`runtime.backends.base`."""
from .base import Backend, ModelLoadError, available_backends, load_model, load_model_bytes, register

__all__ = ["Backend", "ModelLoadError", "available_backends", "load_model", "load_model_bytes", "register"]

"""facekit: face recognition from PyTorch training to fast, verified deployment.

The importable layers are ``runtime`` (inference, torch-free), ``evaluation`` (torch-free protocols),
``train``, ``export`` and ``benchmarks``; this package is the ``facekit`` command that fronts them all.
"""
from runtime import __version__

__all__ = ["__version__"]

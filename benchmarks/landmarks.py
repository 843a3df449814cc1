"""Landmark benchmark: the aligner against the detector's own 5 points (:mod:`evaluation.landmarks`).

    python benchmarks/run.py landmarks --data $FACEKIT_DATA/landmarks_300w/test [--aligner FILE]

``--aligner`` is an exported aligner (ONNX / engine, run by the runtime) or a training checkpoint (run in
PyTorch through ``train/``; needs torch); the default is the shipped ``runtime/models/aligner.onnx``. For a
model with a fallback rule (:class:`runtime.landmarks.FallbackRule`) the table has the points the runtime
returns and the aligner's own points.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.landmarks import evaluate_landmarks
from runtime.shipped import ALIGNER as SHIPPED_ALIGNER
from train.aligner import load_refiner


def landmark_accuracy(data_dir: str | Path, aligner: str | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`evaluation.landmarks.evaluate_landmarks` of the aligner file ``aligner`` on ``data_dir``: the
    points the runtime returns (``"aligner"``), and for a model with a fallback rule also the aligner's own
    points (``"aligner_raw"``), beside the detector's. ``aligner=None``: the shipped aligner."""
    path = Path(aligner) if aligner else SHIPPED_ALIGNER
    if aligner is None and not path.is_file():
        raise FileNotFoundError(f"aligner model {path} not found (train and export one: see runtime/models/aligner.md)")
    refiner = load_refiner(path)
    refiners = {"aligner": refiner}
    if refiner.fallback is not None:
        refiners["aligner_raw"] = load_refiner(path, fallback=False)
    return evaluate_landmarks(data_dir, refiners, progress=progress, model_name=str(aligner or SHIPPED_ALIGNER))

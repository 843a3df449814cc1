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

from benchmarks.parity import CHECKPOINT_SUFFIXES
from evaluation.landmarks import evaluate_landmarks
from runtime.shipped import ALIGNER as SHIPPED_ALIGNER



def load_refiner(aligner: str | None = None, fallback: bool | None = None):
    """The refiner for an aligner file (None: the shipped one): ``runtime.landmarks.LandmarkRefiner`` for
    exported models, ``train.aligner_refiner.TorchRefiner`` for checkpoints; ``fallback=False`` turns the
    model's fallback rule off (the aligner's own points)."""
    path = Path(aligner) if aligner else SHIPPED_ALIGNER
    if not path.is_file():
        hint = " (train and export one: see runtime/models/aligner.md)" if aligner is None else ""
        raise FileNotFoundError(f"aligner model {path} not found{hint}")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        from train.aligner_refiner import TorchRefiner

        return TorchRefiner(path, fallback=fallback)
    from runtime.landmarks import LandmarkRefiner

    return LandmarkRefiner(str(path), fallback=fallback)


def landmark_accuracy(data_dir: str | Path, aligner: str | None = None, progress: bool = True) -> dict[str, Any]:
    """:func:`evaluation.landmarks.evaluate_landmarks` of the aligner file ``aligner`` on ``data_dir``: the
    points the runtime returns (``"aligner"``), and for a model with a fallback rule also the aligner's own
    points (``"aligner_raw"``), beside the detector's."""
    refiner = load_refiner(aligner)
    refiners = {"aligner": refiner}
    if refiner.fallback is not None:
        refiners["aligner_raw"] = load_refiner(aligner, fallback=False)
    return evaluate_landmarks(data_dir, refiners, progress=progress, model_name=str(aligner or SHIPPED_ALIGNER))

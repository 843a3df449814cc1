"""The model files that ship with facekit, in ``runtime/models/``, each beside its model card (``<name>.md``)."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
#: the default recognizer (``recognizer.md``) and its INT8 Q/DQ export
RECOGNIZER = MODELS_DIR / "recognizer.onnx"
RECOGNIZER_INT8 = MODELS_DIR / "recognizer_int8.onnx"
#: the stacked-hourglass 5-point aligner (``aligner.md``)
ALIGNER = MODELS_DIR / "aligner.onnx"
#: the default detector, RetinaFace-MobileNet0.25 (``detector.md``)
DETECTOR = MODELS_DIR / "detector.onnx"
#: the portrait used to check reduced-precision builds, and its landmarks
SAMPLE_FACE_INFO = MODELS_DIR / "sample_face.json"

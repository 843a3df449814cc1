"""dlib's model files (from the ``face_recognition_models`` package) and dlib itself, for the tools that use
them: :mod:`train.dlib_import` (the default recognizer's weights) and the distillation recipe's teacher.
dlib is never a runtime dependency."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

#: Model files of the ``face_recognition_models`` package that facekit uses.
DLIB_EMBEDDER = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
INSTALL_HINT = "pip install dlib-bin face_recognition_models (the 'teacher' extra: pip install -e '.[teacher]')"


def dlib_model_file(name: str) -> Path:
    """A model file of the installed ``face_recognition_models`` package, found without importing it (its
    import needs ``pkg_resources``, which setuptools ≥ 81 no longer has); FileNotFoundError when absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{name} not found: pip install face_recognition_models (the 'teacher' extra)")
    return path


def load_dlib():
    """``(dlib, HOG face detector, 5-point predictor, face embedder)``; exits with how to install them when
    dlib or the model files are missing, and warns when this dlib has no BLAS (~5× slower embedder)."""
    try:
        import dlib

        embedder, predictor = dlib_model_file(DLIB_EMBEDDER), dlib_model_file(DLIB_PREDICTOR)
    except (ImportError, FileNotFoundError):
        sys.exit(f"needs dlib and face_recognition_models: {INSTALL_HINT}")
    if not getattr(dlib, "DLIB_USE_BLAS", True):
        print("this dlib has no BLAS (dlib-bin); its embedder is ~5x slower than a dlib built against OpenBLAS: "
              "apt-get install libopenblas-dev cmake && pip install --no-binary dlib dlib", file=sys.stderr)
    return (dlib, dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(predictor)), dlib.face_recognition_model_v1(str(embedder)))


def face_chip(dlib, predictor, rgb: np.ndarray, rect) -> np.ndarray:
    """dlib's 150×150 RGB chip of the face in ``rect`` (a ``dlib.rectangle``), aligned by its 5-point predictor."""
    return dlib.get_face_chip(rgb, predictor(rgb, rect), 150, 0.25)


def rect_box(rect) -> list[float]:
    """A ``dlib.rectangle`` as an (x1, y1, x2, y2) box."""
    return [float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom())]

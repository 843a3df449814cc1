"""facekit runtime: detect → 5 landmarks → similarity warp → embed → compare / identify.

numpy + opencv + onnxruntime (TensorRT when installed). Never imports torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .geometry import ARCFACE_TEMPLATE_112, LANDMARK_NAMES, estimate_similarity, warp_face  # noqa: E402
from .preprocess import RECOGNIZER_SPEC, PreprocessSpec, l2_normalize, to_model_input  # noqa: E402

__all__ = [
    "ARCFACE_TEMPLATE_112", "LANDMARK_NAMES", "estimate_similarity", "warp_face",
    "RECOGNIZER_SPEC", "PreprocessSpec", "l2_normalize", "to_model_input", "__version__",
]

# The pipeline and gallery are added by runtime/pipeline.py and runtime/gallery.py.
try:  # pragma: no cover - filled in as the modules land
    from .pipeline import Face, FacePipeline  # noqa: F401
    from .gallery import Gallery  # noqa: F401

    __all__ += ["Face", "FacePipeline", "Gallery"]
except ImportError as _e:  # only while those modules do not exist yet
    if "runtime.pipeline" not in str(_e) and "runtime.gallery" not in str(_e) and "No module named 'runtime." not in str(_e):
        raise

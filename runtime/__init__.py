"""facekit runtime: detect → 5 landmarks → similarity warp → embed → compare / identify.

numpy + opencv + Pillow (image headers) + an inference engine: OpenVINO or ONNX Runtime (TensorRT when
installed). Never imports torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .geometry import ARCFACE_TEMPLATE_112, LANDMARK_NAMES, estimate_similarity, warp_face  # noqa: E402
from .preprocess import RECOGNIZER_SPEC, PreprocessSpec, l2_normalize, to_model_input  # noqa: E402
from .faces import Face  # noqa: E402
from .pipeline import FacePipeline  # noqa: E402
from .gallery import Gallery  # noqa: E402

__all__ = [
    "ARCFACE_TEMPLATE_112", "LANDMARK_NAMES", "estimate_similarity", "warp_face",
    "RECOGNIZER_SPEC", "PreprocessSpec", "l2_normalize", "to_model_input", "__version__",
    "Face", "FacePipeline", "Gallery",
]

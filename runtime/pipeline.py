"""`FacePipeline`: detect → 5 landmarks → similarity warp → embed → compare, torch-free.

One pipeline object may be shared by many threads: models are loaded once (lazily, under a lock) and
inference sessions are stateless. Preprocessing and the verification threshold come from the recognizer's
metadata (:mod:`runtime.metadata`), never from guesses.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .backends.base import Backend, ModelLoadError, load_model, onnx_backends
from .batching import ordered_batches
from .cpu import usable_cores
from .detector import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, DEFAULT_SCORE_THRESHOLD, load_detector
from .faces import Comparison, Face, ImageFaces, NoFaceError, Subject
from .image_io import ImageError, LoadedImage, load_image_scaled
from .messages import one_line
from .metadata import check_warp, recognizer_preprocessing
from .preprocess import PreprocessSpec, flip_sum, l2_normalize, to_model_input
from .shipped import ALIGNER as DEFAULT_ALIGNER
from .shipped import RECOGNIZER as DEFAULT_RECOGNIZER
from .subject import choose_subject

LANDMARK_MODES = ("detector", "aligner")


class FacePipeline:
    """Detect, align and embed faces; compare them.

    ``recognizer``/``aligner``: model path (or a served model's URL, e.g. ``triton://host:8001/recognizer``),
    a loaded :class:`~runtime.backends.Backend` (or, for the aligner, a :class:`~runtime.landmarks.LandmarkRefiner`),
    or None for the shipped ``runtime/models/{recognizer,aligner}.onnx``. ``detector``: RetinaFace/SCRFD ONNX
    path or bytes, a detector object, or None for the default RetinaFace-MobileNet0.25. ``landmarks``: ``"detector"`` uses
    the detector's 5 points, ``"aligner"`` refines them with the hourglass aligner (keeping the detector's
    where the aligner's fallback rule says so: profiles, unsure heatmaps). ``backend``: ``"auto"``
    (the fastest backend that really runs each model here) or ``"onnxruntime"``, ``"openvino"``,
    ``"tensorrt"``; :attr:`providers` says what runs each model. ``threshold`` overrides the recognizer's
    ``threshold_cosine``. ``preprocess`` overrides the recognizer's metadata (for models exported without it,
    or to crop faces without a recognizer: then the default recognizer is only loaded when something is
    embedded). ``model_options`` go to every model this pipeline loads (e.g. ``{"threads": 1}``).
    ``flip_test`` (default on) embeds each face and its mirror image and sums the two, as the benchmark
    protocol does — the protocol that the shipped ``threshold_cosine`` comes from.
    """

    def __init__(self, recognizer: str | os.PathLike | Backend | None = None,
                 detector: str | os.PathLike | bytes | Any | None = None, landmarks: str = "detector",
                 aligner: str | os.PathLike | Backend | None = None, backend: str = "auto",
                 threshold: float | None = None, *, preprocess: PreprocessSpec | None = None,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD, max_side: int = DEFAULT_MAX_SIDE,
                 min_side: int = DEFAULT_MIN_SIDE, batch_size: int = 32, flip_test: bool = True,
                 model_options: dict[str, Any] | None = None):
        if landmarks not in LANDMARK_MODES:
            raise ValueError(f"landmarks must be one of {LANDMARK_MODES}, got {landmarks!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.backend_name = backend
        self.landmark_mode = landmarks
        self.score_threshold = float(score_threshold)
        self.batch_size = int(batch_size)
        self.flip_test = bool(flip_test)
        self._threshold_override = None if threshold is None else float(threshold)
        self._preprocess_override = preprocess
        self._model_options = dict(model_options or {})
        self._lock = threading.Lock()

        if detector is None or isinstance(detector, (str, os.PathLike, bytes, bytearray)):
            # ONNX detectors (the default's bytes included) run where ONNX runs; engines use `backend`
            onnx_like = detector is None or isinstance(detector, (bytes, bytearray)) or \
                os.fspath(detector).lower().endswith(".onnx")
            det_backend = backend if backend in onnx_backends() or not onnx_like else "auto"
            self.detector = load_detector(detector, backend=det_backend, max_side=max_side, min_side=min_side,
                                          **self._model_options)
        else:
            if not callable(getattr(detector, "detect", None)):
                raise TypeError(f"detector must be a path, ONNX bytes or an object with .detect(), got {type(detector)}")
            self.detector = detector

        # Explicit models load now (errors surface at construction); a missing shipped default only fails
        # when it is needed, so that e.g. `detect` works in an installation without the recognizer file.
        self._recognizer_src = recognizer
        self._recognizer: Backend | None = None
        self._spec: PreprocessSpec | None = None
        self._meta: dict[str, Any] = {}
        if recognizer is not None or (preprocess is None and DEFAULT_RECOGNIZER.is_file()):
            self._load_recognizer()
        self._aligner_src = aligner
        self._aligner = None
        if landmarks == "aligner" and (aligner is not None or DEFAULT_ALIGNER.is_file()):
            self._load_aligner()

    # ------------------------------------------------------------------------------------------ models

    def _loaded(self, attr: str, load: Callable[[], Any]) -> Any:
        """``self.<attr>``, set to ``load()`` under the pipeline's lock the first time it is asked for."""
        with self._lock:
            value = getattr(self, attr)
            if value is None:
                value = load()
                setattr(self, attr, value)
            return value

    def _load_recognizer(self) -> Backend:
        return self._loaded("_recognizer", self._open_recognizer)

    def _load_aligner(self):
        return self._loaded("_aligner", self._open_aligner)

    def _open_recognizer(self) -> Backend:
        """Load the recognizer and read its preprocessing (``self._meta``, ``self._spec``)."""
        src = self._recognizer_src
        if isinstance(src, Backend):
            model = src
        else:
            path = str(DEFAULT_RECOGNIZER) if src is None else os.fspath(src)  # a str keeps URLs intact
            if src is None and not os.path.isfile(path):
                raise ModelLoadError(
                    f"the default recognizer {path} is missing; pass recognizer=PATH (CLI: --recognizer PATH)"
                )
            model = load_model(path, backend=self.backend_name, **self._model_options)
        if self._preprocess_override is not None:
            meta, spec = dict(model.metadata or {}), self._preprocess_override
            check_warp(spec, model.path)
        else:
            meta, spec = recognizer_preprocessing(model)
        self._meta, self._spec = meta, spec
        return model

    def _open_aligner(self):
        src = self._aligner_src
        path = DEFAULT_ALIGNER if src is None else src
        if src is None and not DEFAULT_ALIGNER.is_file():
            raise ModelLoadError(
                f"the default aligner {DEFAULT_ALIGNER} is missing; pass aligner=PATH (CLI: --aligner PATH) "
                "or use landmarks='detector'"
            )
        from .landmarks import LandmarkRefiner

        if isinstance(path, LandmarkRefiner):
            return path
        if isinstance(path, Backend):
            path = path.path
        return LandmarkRefiner(str(path), backend=self.backend_name, **self._model_options)

    @property
    def recognizer(self) -> Backend:
        """The loaded recognizer backend (loads the default on first access)."""
        return self._recognizer if self._recognizer is not None else self._load_recognizer()

    @property
    def spec(self) -> PreprocessSpec:
        """The crop and tensor preprocessing: the ``preprocess`` override, else the recognizer's metadata."""
        if self._preprocess_override is not None:
            return self._preprocess_override
        self.recognizer
        return self._spec

    @property
    def metadata(self) -> dict[str, Any]:
        """The recognizer's facekit metadata."""
        self.recognizer
        return dict(self._meta)

    @property
    def threshold(self) -> float | None:
        """Cosine threshold for ``same``: the constructor's, else the recognizer's ``threshold_cosine``."""
        if self._threshold_override is not None:
            return self._threshold_override
        value = self.metadata.get("threshold_cosine")
        return None if value is None else float(value)

    @property
    def providers(self) -> dict[str, str]:
        """What really runs each loaded model, e.g. ``{"detector": "CPUExecutionProvider", ...}``."""
        out = {"detector": getattr(self.detector, "device", type(self.detector).__name__)}
        if self._recognizer is not None:
            out["recognizer"] = self._recognizer.device
        if self._aligner is not None:
            out["aligner"] = self._aligner.device
        return out

    # ----------------------------------------------------------------------------------------- stages

    def detect(self, image, color_order: str = "BGR", score_threshold: float | None = None) -> list[Face]:
        """Faces in ``image`` (path, bytes, array in ``color_order``, or a :class:`~runtime.image_io.LoadedImage`),
        best score first, without embeddings.

        In ``landmarks="aligner"`` mode the landmarks are the aligner's.
        """
        img = _load(image, color_order)
        return self._detect(img, score_threshold)

    def _detect(self, image: LoadedImage | np.ndarray, score_threshold: float | None = None,
                refine: bool = True) -> list[Face]:
        """Faces found on the decoded pixels, with boxes and landmarks in the file's pixels."""
        img, scale = _pixels(image)
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        dets = self.detector.detect(img, score_threshold=thr)
        faces = [Face(np.asarray(d.box, np.float32) / np.float32(scale), float(d.score),
                      np.asarray(d.landmarks, np.float32) / np.float32(scale)) for d in dets]
        if refine:
            self._refine(image, faces)
        return faces

    def _refine(self, image: LoadedImage | np.ndarray, faces: list[Face]) -> None:
        """In ``landmarks="aligner"`` mode, replace the faces' landmarks with the aligner's (in place)."""
        if not faces or self.landmark_mode != "aligner":
            return
        img, scale = _pixels(image)
        aligner = self._aligner if self._aligner is not None else self._load_aligner()
        init = np.stack([f.landmarks for f in faces]) * np.float32(scale)
        refined = aligner.refine_many(img, np.stack([f.box for f in faces]) * np.float32(scale),
                                      None if not np.isfinite(init).all() else init)
        for f, pts in zip(faces, refined):
            f.landmarks = np.asarray(pts, np.float32) / np.float32(scale)

    def find_subject(self, image, color_order: str = "BGR", *, min_face: float = 0.0, dominance: float = 0.0,
                     retry_threshold: float | None = None) -> Subject:
        """The subject of ``image`` by :mod:`runtime.subject`'s rule (``min_face`` and ``dominance`` as
        there), without embedding it. With no face at the pipeline's score threshold, detection is retried
        once at ``retry_threshold`` when given. Only the chosen face's landmarks are refined."""
        img = _load(image, color_order)
        thresholds = [self.score_threshold] + ([float(retry_threshold)] if retry_threshold is not None else [])
        faces: list[Face] = []
        for thr in thresholds:
            faces = self._detect(img, thr, refine=False)
            if faces:
                break
        index, reason = choose_subject([f.box for f in faces], img.size[::-1], min_face, dominance,
                                       [f.score for f in faces])
        face = None if index is None else faces[index]
        if face is not None:
            self._refine(img, [face])
        return Subject(img.image, faces, face, reason, thr, img.scale)

    def align(self, image, landmarks: np.ndarray, color_order: str = "BGR") -> np.ndarray:
        """The recognizer-sized crop (default 112×112) of the face with ``landmarks`` (in the input's pixels,
        as :meth:`detect` gives them), in ``color_order``."""
        img = _load(image, color_order)
        crop = self._warp(img, landmarks)
        return crop[..., ::-1].copy() if color_order.upper() == "RGB" else crop

    def _warp(self, image: LoadedImage | np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The aligned crop for ``landmarks`` given in the file's pixels."""
        img_bgr, scale = _pixels(image)
        pts = np.asarray(landmarks, np.float32)
        if pts.shape != (5, 2):
            raise ValueError(f"expected (5, 2) landmarks, got shape {pts.shape}")
        if not np.isfinite(pts).all():
            raise ValueError("landmarks are missing (NaN): this detector has no landmark head; "
                             "use landmarks='aligner'")
        return self.spec.warp(img_bgr, pts * np.float32(scale))

    def embed_aligned(self, crops: np.ndarray | Sequence[np.ndarray], color_order: str = "BGR",
                      batch_size: int | None = None) -> np.ndarray:
        """L2-normalised embeddings (N×D float32) of aligned uint8 crops (N×H×W×3 or a list of H×W×3);
        with ``flip_test`` each is the sum of the crop's and its mirror image's raw embeddings."""
        x = np.asarray(crops) if not isinstance(crops, (list, tuple)) else (
            np.stack([np.asarray(c) for c in crops]) if len(crops) else np.zeros((0, 0, 0, 3), np.uint8))
        if x.ndim == 3:
            x = x[None]
        if x.dtype != np.uint8:
            raise ValueError(f"aligned crops must be uint8, got {x.dtype}")
        spec = self.spec
        model = self.recognizer
        if len(x) == 0:
            return np.zeros((0, int(self._meta.get("embedding_size", 0) or 0)), np.float32)
        bs = int(batch_size or self.batch_size)

        def raw(crops: np.ndarray) -> np.ndarray:
            return model.run_batched(crops, bs, lambda c: to_model_input(c, spec, color_order=color_order)
                                     ).reshape(len(crops), -1)

        emb = flip_sum(raw, x) if self.flip_test else raw(x)
        if not np.isfinite(emb).all():
            raise RuntimeError(f"{model.path}: the recognizer produced NaN/inf embeddings")
        return l2_normalize(emb)

    def embed(self, image, color_order: str = "BGR", score_threshold: float | None = None) -> list[Face]:
        """Faces in ``image`` with L2-normalised embeddings (all faces embedded in batches)."""
        img = _load(image, color_order)
        faces = self._detect(img, score_threshold)
        if faces:
            self.recognizer  # load before warping: the crop size comes from its metadata
            crops = np.stack([self._warp(img, f.landmarks) for f in faces])
            for f, e in zip(faces, self.embed_aligned(crops, color_order="BGR")):
                f.embedding = e
        return faces

    def embed_many(self, images: Iterable[Any], color_order: str = "BGR", *, subject: bool = False,
                   min_face: float = 0.0, dominance: float = 0.0, retry_threshold: float | None = None,
                   score_threshold: float | None = None, batch_size: int | None = None,
                   workers: int | None = None, window: int | None = None) -> Iterator[ImageFaces]:
        """One :class:`ImageFaces` per item of ``images`` (paths, bytes or arrays; any iterable, endless
        ones included), in input order. A bad item gives a result with ``error``, never an exception.

        ``workers`` threads (default: the usable cores) decode, detect and warp; the faces of several
        images are embedded in one recognizer call of up to ``batch_size`` faces (default: the
        pipeline's); at most ``window`` items (default ``2 × batch_size``) are read ahead. Embeddings match
        :meth:`embed`'s (``subject=True``: :meth:`find_subject`'s face, with ``min_face``,
        ``dominance`` and ``retry_threshold`` as there, is the only one embedded).
        """
        if isinstance(images, (str, bytes, bytearray, os.PathLike)):
            raise TypeError("embed_many takes an iterable of images; for one image use embed()")
        self.recognizer  # load now: a missing model is the caller's error, not an image's
        bs = int(batch_size or self.batch_size)
        prepare = functools.partial(self._prepare_faces, color_order=color_order, subject=subject,
                                    options=dict(min_face=min_face, dominance=dominance,
                                                 retry_threshold=retry_threshold), score_threshold=score_threshold)
        return ordered_batches(enumerate(images), prepare, self._embed_prepared, weight=lambda p: len(p[1]),
                               batch_size=bs, workers=usable_cores() if workers is None else int(workers),
                               window=int(window or 2 * bs))

    def _prepare_faces(self, item: tuple[int, Any], color_order: str, subject: bool, options: dict[str, Any],
                       score_threshold: float | None) -> tuple[ImageFaces, list[np.ndarray]]:
        """Decode, detect and warp one item of :meth:`embed_many`: its result (not embedded yet) and crops."""
        index, image = item
        result = ImageFaces(index, _describe(image))
        try:
            if subject:
                found = self.find_subject(image, color_order, **options)
                result.faces, result.face, result.reason = found.faces, found.face, found.reason
                face, scale = found.face, np.float32(found.scale)
                return result, [] if face is None else [self._warp(found.image, face.landmarks * scale)]
            img = _load(image, color_order)
            result.faces = self._detect(img, score_threshold)
            return result, [self._warp(img, f.landmarks) for f in result.faces]
        except Exception as e:  # noqa: BLE001 - one bad input is a result, not a failed batch
            result.faces, result.face, result.error = [], None, _reason(e)
            return result, []

    def _embed_prepared(self, batch: list[tuple[ImageFaces, list[np.ndarray]]]) -> list[ImageFaces]:
        """Embed the crops of a batch of prepared images in one recognizer call (per image on failure)."""
        crops = [c for _, cs in batch for c in cs]
        try:
            emb = self.embed_aligned(np.stack(crops)) if crops else np.zeros((0, 0), np.float32)
        except Exception as e:  # noqa: BLE001 - find the image that fails, keep the others
            if len(batch) == 1:
                result, _ = batch[0]
                result.faces, result.face, result.error = [], None, f"recognizer failed: {_reason(e)}"
                return [result]
            return [r for item in batch for r in self._embed_prepared([item])]
        rows = iter(emb)
        for result, cs in batch:
            targets = [result.face] if result.face is not None else result.faces
            for f, _ in zip(targets, cs):
                f.embedding = next(rows)
        return [r for r, _ in batch]

    def subject_face(self, image, color_order: str = "BGR") -> Face:
        """The embedded subject face of ``image`` (:meth:`find_subject`); :class:`NoFaceError` when it has no face."""
        found = self.find_subject(image, color_order)
        if found.face is None:
            raise NoFaceError(f"{_describe(image)}: no face found")
        self.recognizer
        face = found.face
        crop = self._warp(found.image, face.landmarks * np.float32(found.scale))
        face.embedding = self.embed_aligned(crop[None], color_order="BGR")[0]
        return face

    def compare(self, a, b, color_order: str = "BGR") -> Comparison:
        """Cosine similarity of the subject face of ``a`` and of ``b``, and the same/different verdict."""
        fa = self.subject_face(a, color_order)
        fb = self.subject_face(b, color_order)
        sim = float(np.dot(fa.embedding, fb.embedding))
        thr = self.threshold
        return Comparison(sim, None if thr is None else bool(sim >= thr), thr, fa, fb)

    def __repr__(self) -> str:
        return f"FacePipeline(landmarks={self.landmark_mode!r}, providers={self.providers})"


# --------------------------------------------------------------------------------------------- helpers


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, np.ndarray):
        return f"<array {src.shape}>"
    return f"<{type(src).__name__}>"


def _reason(e: BaseException) -> str:
    """Why an input failed, in one line (an :class:`ImageError`'s reason, else the exception's message)."""
    if isinstance(e, ImageError):
        return e.reason
    return one_line(e)


def _load(image, color_order: str) -> LoadedImage:
    """The decoded image with its scale to the file (large JPEGs are decoded reduced, see runtime.image_io)."""
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, Path):
        image = str(image)
    return load_image_scaled(image, color_order=color_order)


def _pixels(image: LoadedImage | np.ndarray) -> tuple[np.ndarray, float]:
    return (image.image, image.scale) if isinstance(image, LoadedImage) else (image, 1.0)


__all__ = ["Face", "FacePipeline", "Comparison", "ImageFaces", "Subject", "NoFaceError", "ImageError",
           "DEFAULT_RECOGNIZER", "DEFAULT_ALIGNER"]

"""Face detection: RetinaFace (default: the shipped MobileNet-0.25, ``models/detector.onnx``) and SCRFD ONNX models.

Only the network runs in a backend; prior boxes, box/landmark decoding and NMS are the project's own numpy
code below. Every detector returns :class:`Detection` objects in the coordinates of the image it was given,
with the 5 landmarks in :data:`runtime.geometry.LANDMARK_NAMES` order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from . import shipped
from .backends.base import Backend, ModelLoadError, load_model, load_model_bytes
from .sample_face import sample_image

#: RetinaFace anchors: feature strides and the square anchor sizes (pixels) at each stride.
RETINAFACE_STEPS: tuple[int, ...] = (8, 16, 32)
RETINAFACE_MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
#: RetinaFace box/landmark encoding variances (centre, size).
RETINAFACE_VARIANCES: tuple[float, float] = (0.1, 0.2)
#: RetinaFace input: BGR pixels minus this per-channel mean, no scaling.
RETINAFACE_MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)
#: SCRFD input: RGB pixels, (x - 127.5) / 128.
SCRFD_MEAN, SCRFD_STD = 127.5, 128.0

#: The default detector: RetinaFace-MobileNet0.25 (``models/detector.md``).
DEFAULT_DETECTOR = shipped.DETECTOR
#: Detection image size limits: longer side at most ``DEFAULT_MAX_SIDE``; images whose shorter side is
#: below ``DEFAULT_MIN_SIDE`` are upscaled (close-up crops such as LFW's 160×160 need context).
DEFAULT_MAX_SIDE = 640
DEFAULT_MIN_SIDE = 320
#: Detections scoring below this are dropped, unless a caller asks for another threshold.
DEFAULT_SCORE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected face: ``box`` x1,y1,x2,y2 (float32, pixels), ``score`` in [0,1], ``landmarks`` (5,2) float32."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def to_dict(self) -> dict:
        """JSON-friendly form: ``box`` [x1,y1,x2,y2], ``score``, ``landmarks`` [[x,y]×5]."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


# ----------------------------------------------------------------------------------------- geometry helpers


@lru_cache(maxsize=32)
def _prior_boxes_cached(height: int, width: int, steps: tuple, min_sizes: tuple) -> np.ndarray:
    blocks = []
    for step, sizes in zip(steps, min_sizes):
        fh, fw = -(-height // step), -(-width // step)  # ceil: what the stride-2 convolutions produce
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        centers = np.stack([(xs.ravel() + 0.5) * step, (ys.ravel() + 0.5) * step], axis=1)
        wh = np.asarray(sizes, dtype=np.float64)[:, None].repeat(2, axis=1)  # (A, 2) square anchors
        block = np.concatenate(
            [np.repeat(centers, len(sizes), axis=0), np.tile(wh, (len(centers), 1))], axis=1
        )
        blocks.append(block)
    out = np.concatenate(blocks).astype(np.float32)
    out.setflags(write=False)
    return out


def prior_boxes(height: int, width: int, steps=RETINAFACE_STEPS, min_sizes=RETINAFACE_MIN_SIZES) -> np.ndarray:
    """RetinaFace anchors for an input of ``height``×``width``: (N, 4) cx, cy, w, h in pixels.

    Order: stride by stride; within a stride row-major over the feature map, then the anchor sizes.
    """
    return _prior_boxes_cached(int(height), int(width), tuple(steps), tuple(tuple(s) for s in min_sizes))


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances=RETINAFACE_VARIANCES) -> np.ndarray:
    """RetinaFace box regression (N,4) → x1,y1,x2,y2 in the priors' pixel units."""
    loc = np.asarray(loc, dtype=np.float32)
    centers = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(np.clip(loc[:, 2:] * variances[1], -10.0, 10.0))
    return np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)


def decode_landmarks(pre: np.ndarray, priors: np.ndarray, variances=RETINAFACE_VARIANCES) -> np.ndarray:
    """RetinaFace landmark regression (N,10) → (N,5,2) pixel points."""
    pre = np.asarray(pre, dtype=np.float32).reshape(len(priors), 5, 2)
    return priors[:, None, :2] + pre * variances[0] * priors[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.4) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def scrfd_anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """SCRFD anchor points of one stride: (fh·fw·A, 2) x,y pixels, row-major, each repeated A times."""
    fh, fw = -(-height // stride), -(-width // stride)
    ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    centers = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32) * stride
    return np.repeat(centers, num_anchors, axis=0)


def distance_to_box(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """SCRFD box decoding: (left, top, right, bottom) distances from the anchor point → x1,y1,x2,y2."""
    return np.concatenate([points - distance[:, :2], points + distance[:, 2:4]], axis=1)


def distance_to_points(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """SCRFD landmark decoding: (N, 2K) offsets from the anchor point → (N, K, 2)."""
    return points[:, None, :] + distance.reshape(len(points), -1, 2)


def _select(boxes, scores, landmarks, score_threshold, nms_threshold, scale: tuple[float, float],
            clip_to: tuple[int, int] | None = None) -> list[Detection]:
    """Threshold, NMS, and map boxes/landmarks from detection-input pixels back to the image."""
    mask = np.isfinite(scores) & (scores >= score_threshold)
    boxes, scores, landmarks = boxes[mask], scores[mask], landmarks[mask]
    finite = np.isfinite(boxes).all(1)  # landmarks may be NaN: SCRFD models without a landmark head
    boxes, scores, landmarks = boxes[finite], scores[finite], landmarks[finite]
    keep = nms(boxes, scores, nms_threshold)
    out = []
    sx, sy = scale
    for i in keep:
        b = boxes[i] / np.array([sx, sy, sx, sy], np.float32)
        p = landmarks[i] / np.array([sx, sy], np.float32)
        if clip_to is not None:
            h, w = clip_to
            b = np.clip(b, 0, [w, h, w, h])
        if b[2] - b[0] < 1 or b[3] - b[1] < 1:
            continue
        out.append(Detection(box=b.astype(np.float32), score=float(scores[i]), landmarks=p.astype(np.float32)))
    return out


# ------------------------------------------------------------------------------------------------ detectors


def _pad_to(image: np.ndarray, height: int, width: int, value) -> np.ndarray:
    """``image`` padded on the bottom and right to ``height``×``width`` with a constant colour."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    return cv2.copyMakeBorder(image, 0, height - h, 0, width - w, cv2.BORDER_CONSTANT, value=tuple(float(v) for v in value))


def _as_bgr(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 BGR image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}; load it with runtime.image_io.load_image")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image is empty ({img.shape[1]}×{img.shape[0]})")
    return img


def detection_scale(height: int, width: int, max_side: int | None, min_side: int | None) -> float:
    """Resize factor for detection: upscale so the shorter side reaches ``min_side``, but never let the
    longer side exceed ``max_side`` (the cap wins)."""
    scale = 1.0
    if min_side and min(height, width) < min_side:
        scale = min_side / min(height, width)
    if max_side and max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    return scale


def _retinaface_roles(backend: Backend) -> tuple[int, int, int]:
    """Output indices of (loc, conf, landmarks), found by their last dimension (4, 2, 10)."""
    last = [s[-1] if s else None for s in backend.output_shapes]
    try:
        return last.index(4), last.index(2), last.index(10)
    except ValueError:
        raise ModelLoadError(
            f"{backend.path}: not a RetinaFace detector (outputs end in {last}; expected 4, 2 and 10)"
        ) from None


def _scrfd_groups(backend: Backend) -> list[tuple[int, int, int, int | None]]:
    """Pair SCRFD outputs per stride: (stride, score, box, kps) by last dim (1/4/10) and row count."""
    shapes = backend.output_shapes
    by_dim: dict[int, list[int]] = {1: [], 4: [], 10: []}
    for i, s in enumerate(shapes):
        if s and s[-1] in by_dim:
            by_dim[s[-1]].append(i)
    n = len(by_dim[1])
    if n not in (3, 5) or len(by_dim[4]) != n or len(by_dim[10]) not in (0, n):
        raise ModelLoadError(f"{backend.path}: not an SCRFD detector (output shapes {shapes})")
    strides = (8, 16, 32) if n == 3 else (8, 16, 32, 64, 128)
    # insightface exports list outputs stride by stride within each kind (scores, boxes, kps)
    kps = by_dim[10] or [None] * n
    return [(s, by_dim[1][k], by_dim[4][k], kps[k]) for k, s in enumerate(strides)]


class _OnnxDetector:
    """Shared plumbing: load the model through a runtime backend, letterbox/rescale the image."""

    kind = "detector"

    def __init__(self, model: str | bytes | Backend | None, backend: str = "auto",
                 max_side: int | None = DEFAULT_MAX_SIDE, min_side: int | None = DEFAULT_MIN_SIDE):
        self.backend = _load_backend(model, backend)
        self.max_side = max_side
        self.min_side = min_side
        shape = list(self.backend.input_shape)
        self.fixed_size = tuple(shape[2:4]) if all(isinstance(v, int) and v > 0 for v in shape[2:4]) else None
        self._layout = self._read_layout(self.backend)

    @staticmethod
    def _read_layout(backend: Backend) -> Any:
        """Which model output is which, read once from the output shapes (ModelLoadError: not this kind)."""
        raise NotImplementedError

    @property
    def device(self) -> str:
        """What really runs the detector (e.g. ``CPUExecutionProvider``, ``OpenVINO CPU f32``)."""
        return self.backend.device

    def detect(self, image_bgr: np.ndarray, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
               nms_threshold: float = 0.4, max_side: int | None = None, min_side: int | None = None) -> list[Detection]:
        """Faces in a uint8 BGR image, best score first, in the image's own pixel coordinates.

        The image is resized for detection only: longer side ≤ ``max_side``, shorter side ≥ ``min_side``
        (None: the detector's defaults, 0: no limit); fixed-size models get a letterboxed input.
        """
        image = _as_bgr(image_bgr)
        x, (ph, pw), scale = self.model_input(image, max_side, min_side)
        boxes, scores, points = self._decode(self.backend.run(x), ph, pw)
        return _select(boxes, scores, points, score_threshold, nms_threshold, scale, clip_to=image.shape[:2])

    def _decode(self, outputs: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (N, 4), scores (N,) and landmarks (N, 5, 2), in input pixels, from the model's outputs for an
        input of ``height``×``width``."""
        raise NotImplementedError

    def _prepare(self, image: np.ndarray, max_side, min_side):
        """Resize ``image`` for detection; returns (resized HxWx3 uint8, padded input (h, w), scale (sx, sy))."""
        h, w = image.shape[:2]
        max_side = self.max_side if max_side is None else max_side
        min_side = self.min_side if min_side is None else min_side
        if self.fixed_size is not None:
            fh, fw = self.fixed_size
            scale = min(fh / h, fw / w)
        else:
            scale = detection_scale(h, w, max_side, min_side)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (nh, nw) != (h, w):
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            image = cv2.resize(image, (nw, nh), interpolation=interp)
        if self.fixed_size is not None:
            ph, pw = self.fixed_size
        else:  # pad to a multiple of 32 so every stride sees whole cells
            ph, pw = -(-nh // 32) * 32, -(-nw // 32) * 32
        return image, (ph, pw), (nw / w, nh / h)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"


class RetinaFaceDetector(_OnnxDetector):
    """RetinaFace ONNX detector (``loc`` (N,4), ``conf`` (N,2), ``landmarks`` (N,10) outputs).

    ``model``: a path, ONNX bytes, a loaded backend, or None for the shipped RetinaFace-MobileNet0.25
    (:data:`DEFAULT_DETECTOR`).
    """

    kind = "retinaface"
    _read_layout = staticmethod(_retinaface_roles)

    def _decode(self, outputs: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        loc, conf, landm = (np.asarray(outputs[i])[0] for i in self._layout)
        priors = prior_boxes(height, width)
        if len(loc) != len(priors):
            raise ModelLoadError(
                f"{self.backend.path}: RetinaFace output has {len(loc)} boxes for a {width}×{height} input, expected "
                f"{len(priors)} (strides {RETINAFACE_STEPS}, 2 anchors); not a compatible RetinaFace model"
            )
        return decode_boxes(loc, priors), _face_probability(conf), decode_landmarks(landm, priors)

    def model_input(self, image_bgr: np.ndarray, max_side: int | None = None, min_side: int | None = None):
        """The network input for a uint8 BGR image: (NCHW float32, padded (h, w), scale (sx, sy))."""
        resized, (ph, pw), scale = self._prepare(_as_bgr(image_bgr), max_side, min_side)
        # pad with the mean colour (zero after subtraction), then BGR − mean as NCHW float32
        padded = _pad_to(resized, ph, pw, RETINAFACE_MEAN_BGR)
        return cv2.dnn.blobFromImage(padded, 1.0, None, RETINAFACE_MEAN_BGR, swapRB=False, crop=False), (ph, pw), scale


class SCRFDDetector(_OnnxDetector):
    """insightface SCRFD ONNX detector: per-stride score (N,1), box distance (N,4) and optional landmark
    distance (N,10) outputs, strides 8/16/32 (or 8..128), anchor points with 1–2 anchors each."""

    kind = "scrfd"
    _read_layout = staticmethod(_scrfd_groups)

    def _decode(self, outputs: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return decode_scrfd(outputs, self._layout, height, width)

    def model_input(self, image_bgr: np.ndarray, max_side: int | None = None, min_side: int | None = None):
        """The network input for a uint8 BGR image: (NCHW float32, padded (h, w), scale (sx, sy))."""
        resized, (ph, pw), scale = self._prepare(_as_bgr(image_bgr), max_side, min_side)
        padded = _pad_to(resized, ph, pw, (0, 0, 0))  # black padding, as insightface does
        return cv2.dnn.blobFromImage(padded, 1.0 / SCRFD_STD, None, (SCRFD_MEAN,) * 3, swapRB=True, crop=False), (ph, pw), scale


def decode_scrfd(outputs: list[np.ndarray], groups: list[tuple[int, int, int, int | None]],
                 height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode SCRFD outputs for an input of ``height``×``width``.

    ``groups``: per stride (stride, score output index, box output index, landmark output index or None).
    Returns boxes (N,4), scores (N,), landmarks (N,5,2) in input pixels (NaN landmarks when the model has none).
    """
    all_boxes, all_scores, all_points = [], [], []
    for stride, i_score, i_box, i_kps in groups:
        scores = _rows(outputs[i_score], 1)[:, 0]
        dist = _rows(outputs[i_box], 4) * stride
        cells = (-(-height // stride)) * (-(-width // stride))
        if len(scores) % cells:
            raise ModelLoadError(f"SCRFD stride {stride}: {len(scores)} scores do not fit a {width}×{height} input")
        centers = scrfd_anchor_centers(height, width, stride, len(scores) // cells)
        all_boxes.append(distance_to_box(centers, dist))
        all_scores.append(scores)
        if i_kps is not None:
            all_points.append(distance_to_points(centers, _rows(outputs[i_kps], 10) * stride))
        else:
            all_points.append(np.full((len(scores), 5, 2), np.nan, np.float32))
    return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_points)


def _rows(x: np.ndarray, cols: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(-1, cols)


def _face_probability(conf: np.ndarray) -> np.ndarray:
    """Column 1 of a (N,2) background/face output, applying softmax when the model emits logits."""
    conf = np.asarray(conf, dtype=np.float32)
    if conf.size and (conf.min() < 0 or conf.max() > 1 or not np.allclose(conf.sum(1), 1, atol=1e-3)):
        e = np.exp(conf - conf.max(1, keepdims=True))
        conf = e / e.sum(1, keepdims=True)
    return conf[:, 1]


def _load_backend(model: str | bytes | Backend | None, backend: str, **options) -> Backend:
    if isinstance(model, Backend):
        return model
    if model is None:
        model = DEFAULT_DETECTOR
    if isinstance(model, (bytes, bytearray, memoryview)):
        return load_model_bytes(bytes(model), backend=backend, label="<detector bytes>",
                                check_inputs=sample_inputs, **options)
    return load_model(os.fspath(model), backend=backend, check_inputs=sample_inputs, **options)


def sample_inputs(backend: Backend) -> list[np.ndarray]:
    """The detector inputs of the runtime's sample face photo and its mirror image (for precision checks)."""
    detector = _detector_for(backend)
    image = sample_image()
    return [detector.model_input(img)[0] for img in (image, np.ascontiguousarray(image[:, ::-1]))]


def load_detector(model: str | os.PathLike | bytes | None = None, backend: str = "auto",
                  max_side: int | None = DEFAULT_MAX_SIDE,
                  min_side: int | None = DEFAULT_MIN_SIDE, **options) -> RetinaFaceDetector | SCRFDDetector:
    """A detector for ``model`` (None: the default RetinaFace), RetinaFace or SCRFD picked by its outputs;
    ``options`` go to the backend that loads the model (e.g. ``threads=1``)."""
    return _detector_for(_load_backend(model, backend, **options), max_side, min_side, source=model)


def _detector_for(loaded: Backend, max_side: int | None = DEFAULT_MAX_SIDE, min_side: int | None = DEFAULT_MIN_SIDE,
                  source=None) -> RetinaFaceDetector | SCRFDDetector:
    """The detector kind (RetinaFace or SCRFD) that a loaded model's outputs show."""
    last = [s[-1] if s else None for s in loaded.output_shapes]
    if sorted(last) == [2, 4, 10]:
        return RetinaFaceDetector(loaded, max_side=max_side, min_side=min_side)
    if last.count(1) in (3, 5):
        return SCRFDDetector(loaded, max_side=max_side, min_side=min_side)
    raise ModelLoadError(
        f"{getattr(loaded, 'path', source)}: not a face detector this runtime knows "
        f"(outputs end in {last}; RetinaFace has 4/2/10, SCRFD 1/4/10 per stride)"
    )

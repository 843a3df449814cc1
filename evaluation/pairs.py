"""Verification pair sets: LFW, CFP-FP / CFP-FF and insightface ``.bin`` files, in the protocols' order.

A :class:`PairSet` lists each image once (``images``) and the pairs as indices into that list, in the
protocol's order (so 10 contiguous folds are the official splits):

- LFW ``pairs.txt`` (View 2): header ``10 300``, then per fold 300 same (``name i j``) and 300 different
  (``name1 i name2 j``) pairs; images ``<root>/images/<name>/<name>_<i:04d>.jpg`` (or ``<root>/<name>/…``;
  an aligned tree written by ``train/make_aligned.py`` may hold ``.png`` files).
- CFP: ``Protocol/Split/{FP,FF}/01..10/{same,diff}.txt`` hold ``a,b`` indices into
  ``Protocol/Pair_list_F.txt`` (first image, frontal) and ``Pair_list_P.txt`` (second image: profile for FP,
  frontal again for FF); paths there are relative to ``Protocol/``. Order: split 01 same, split 01 diff,
  split 02 same, … (350 + 350 per split).
- insightface ``.bin``: see :mod:`evaluation.bin_format`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.files import existing_file

from .bin_format import load_bin_pickle
from .errors import BinFormatError, DatasetError

__all__ = ["PairSet", "DatasetError", "BinFormatError", "load_lfw", "load_cfp", "load_bin", "load_pairset",
           "STANDARD_SETS", "standard_pair_sets", "missing_set_note", "lfw_images", "subset_pairs", "restrict",
           "PAIR_SET_KINDS"]

#: The kinds :func:`load_pairset` reads.
PAIR_SET_KINDS = ("lfw", "cfp-fp", "cfp-ff", "bin")


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


#: Other extensions tried for an LFW image named ``…jpg`` by pairs.txt (aligned trees hold PNG crops).
LFW_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG")


def _lfw_image(image_dir: Path, name: str, num: str) -> Path:
    """The file of LFW image ``name`` ``num``: the ``.jpg`` pairs.txt means, or the same stem in another
    extension of :data:`LFW_EXTENSIONS` (the ``.jpg`` path when none exists)."""
    path = image_dir / name / f"{name}_{int(num):04d}.jpg"
    for ext in LFW_EXTENSIONS:
        if path.with_suffix(ext).is_file():
            return path.with_suffix(ext)
    return path


def _read_lfw_pairs(pairs_path: Path) -> tuple[int, int, list[list[str]]]:
    """``(folds, pairs per class, pair lines split into fields)`` of an LFW ``pairs.txt``."""
    lines = [ln.split() for ln in pairs_path.read_text().splitlines() if ln.strip()]
    try:
        n_folds, per_fold = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError):
        raise DatasetError(f"{pairs_path}: first line must be '<folds> <pairs per class>', got {lines[:1]}") from None
    body = lines[1:]
    if len(body) != n_folds * per_fold * 2:
        raise DatasetError(f"{pairs_path}: expected {n_folds * per_fold * 2} pair lines, found {len(body)}")
    return n_folds, per_fold, body


def load_lfw(root: str | os.PathLike, pairs_file: str | os.PathLike | None = None,
             skip_missing: bool = False) -> PairSet:
    """LFW View 2 from a folder holding ``pairs.txt`` and the images (10 folds × (300 same + 300 diff)).

    ``pairs_file`` overrides ``root/pairs.txt``. A missing image is an error, unless ``skip_missing``:
    then its pairs are left out with one warning (an aligned tree without the photos alignment failed on).
    """
    root = Path(root)
    if root.is_file() and root.name.endswith(".txt"):
        pairs_file, root = root, root.parent
    if not root.is_dir():
        raise DatasetError(f"{root}: LFW folder not found")
    pairs_path = Path(pairs_file) if pairs_file else root / "pairs.txt"
    if not pairs_path.is_file():
        raise DatasetError(f"{root}: no pairs.txt (LFW View 2 pair list) found")
    image_dir = _lfw_image_dir(root)
    n_folds, per_fold, body = _read_lfw_pairs(pairs_path)
    index: dict[str, int] = {}
    images: list[Path] = []
    identities: list[str] = []

    def image(name: str, num: str) -> int:
        path = _lfw_image(image_dir, name, num)
        if str(path) not in index:
            index[str(path)] = len(images)
            images.append(path)
            identities.append(name)
        return index[str(path)]

    pairs, issame = [], []
    for k, parts in enumerate(body):
        if len(parts) not in (3, 4):
            raise DatasetError(f"{pairs_path}:{k + 2}: expected 3 or 4 fields, got {parts}")
        other = parts[0] if len(parts) == 3 else parts[2]
        pairs.append((image(parts[0], parts[1]), image(other, parts[-1])))
        issame.append(len(parts) == 3)
    ps = PairSet("lfw", str(root.resolve()), images, np.array(pairs), np.array(issame), aligned=False,
                 identities=identities, notes={"folds": n_folds, "pairs_per_class": per_fold})
    missing = {index[str(p)] for p in images if not p.is_file()}
    if not missing:
        return ps
    if not skip_missing:
        raise DatasetError(f"{root}: {len(missing)} images named in pairs.txt are missing, "
                           f"e.g. {images[min(missing)]}")
    keep = np.array([a not in missing and b not in missing for a, b in ps.pairs])
    warnings.warn(f"{int((~keep).sum())} of {len(keep)} LFW pairs skipped: image missing under {image_dir}",
                  stacklevel=2)
    if not keep.any():
        raise DatasetError(f"no usable LFW pairs under {root}")
    return restrict(ps, np.flatnonzero(keep))


# ------------------------------------------------------------------------------------------------ CFP


def _read_pair_list(path: Path) -> dict[int, Path]:
    existing_file(path, DatasetError, "CFP image list")
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


# ------------------------------------------------------------------------------------------ .bin, any kind


def load_bin(path: str | os.PathLike) -> PairSet:
    """An insightface ``.bin`` (LFW, CFP-FP, AgeDB-30, …) as a :class:`PairSet` of pre-aligned crops."""
    bins, flags = load_bin_pickle(path)
    n = len(flags)
    pairs = np.stack([np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2)], axis=1)
    return PairSet(Path(path).stem, str(Path(path).resolve()), bins, pairs, np.array(flags, bool), aligned=True)


def load_pairset(kind: str, data: str | os.PathLike, pairs_file: str | os.PathLike | None = None,
                 skip_missing: bool = False) -> PairSet:
    """``kind`` in :data:`PAIR_SET_KINDS`; ``pairs_file`` and ``skip_missing`` as :func:`load_lfw` has them."""
    kind = kind.lower()
    if kind == "lfw":
        return load_lfw(data, pairs_file, skip_missing=skip_missing)
    if kind in ("cfp-fp", "cfp-ff"):
        return load_cfp(data, kind.split("-")[1].upper())
    if kind == "bin":
        return load_bin(data)
    raise ValueError(f"unknown dataset kind {kind!r} ({', '.join(PAIR_SET_KINDS)})")


# ------------------------------------------------------------------------------------------------ subsets


#: The standard verification sets under a data root: name → (folder, the entry that shows the set is there).
STANDARD_SETS = {"LFW": ("lfw", "pairs.txt"), "CFP-FP": ("cfp", "Protocol"), "CFP-FF": ("cfp", "Protocol")}


def standard_pair_sets(root: str | os.PathLike, names: Sequence[str]) -> tuple[dict[str, PairSet], dict[str, Path]]:
    """The sets ``names`` (keys of :data:`STANDARD_SETS`) found under ``root``, loaded, and for each missing
    one the folder it was looked for in."""
    found, missing = {}, {}
    for name in names:
        folder, marker = STANDARD_SETS[name]
        path = Path(root) / folder
        if not (path / marker).exists():
            missing[name] = path
        elif name == "LFW":
            found[name] = load_lfw(path)
        else:
            found[name] = load_cfp(path, name.split("-")[1])
    return found, missing


#: What each standard set's folder holds, for the note that says it is missing.
_FOLDER_CONTENTS = {"lfw": "pairs.txt and images/", "cfp": "Protocol/ and Data/"}


def missing_set_note(name: str, folder: str | os.PathLike) -> str:
    """One line saying that the standard set ``name`` is not at ``folder``, what that folder must hold and
    how to point at the data (CFP-FP and CFP-FF share one note)."""
    kind = STANDARD_SETS[name][0]
    holding = " and ".join(f"{k}/" for k in _FOLDER_CONTENTS)
    return (f"{name.split('-')[0]} not found at {folder} (needs {_FOLDER_CONTENTS[kind]}); "
            f"set $FACEKIT_DATA to the folder holding {holding}")


def lfw_images(folder: str | os.PathLike, count: int) -> list[str]:
    """The first ``count`` images of LFW's ``pairs.txt`` in ``folder``, in file order: a fixed sample of real
    photos (DatasetError, with :func:`missing_set_note`'s words, when the folder is not LFW)."""
    if not (Path(folder) / STANDARD_SETS["LFW"][1]).is_file():
        raise DatasetError(missing_set_note("LFW", folder))
    return [str(p) for p in load_lfw(folder).images[:count]]


def subset_pairs(pairs: np.ndarray, issame: np.ndarray, per_fold: int, n_folds: int = 10) -> np.ndarray:
    """Indices of the first ``per_fold`` same and ``per_fold`` different pairs of each of ``n_folds``
    contiguous folds, in protocol order (so 10-fold evaluation on the subset still uses one block per
    original fold)."""
    n = len(pairs)
    bounds = np.linspace(0, n, n_folds + 1).astype(int)
    keep = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        idx = np.arange(lo, hi)
        same, diff = idx[issame[idx]], idx[~issame[idx]]
        keep.extend(sorted(np.concatenate([same[:per_fold], diff[:per_fold]]).tolist()))
    return np.asarray(keep, dtype=np.int64)


def first_pairs(issame: np.ndarray, max_pairs: int) -> np.ndarray:
    """Indices of ``max_pairs`` pairs taken alternately from the same and the different pairs, in order
    (a quick check that still has both kinds); all pairs when ``max_pairs`` is 0 or covers them."""
    issame = np.asarray(issame, bool)
    if not max_pairs or max_pairs >= len(issame):
        return np.arange(len(issame))
    same, diff = np.flatnonzero(issame), np.flatnonzero(~issame)
    half = max_pairs // 2
    return np.asarray([i for pair in zip(same[:half], diff[:half]) for i in pair], dtype=np.int64)


def restrict(pairset: PairSet, keep: np.ndarray) -> PairSet:
    """The pair set restricted to pairs ``keep`` (in that order) and the images they use."""
    pairs = pairset.pairs[keep]
    used = np.unique(pairs)
    remap = np.full(len(pairset.images), -1, np.int64)
    remap[used] = np.arange(len(used))
    ids = [pairset.identities[i] for i in used] if pairset.identities else None
    return PairSet(pairset.name, pairset.source, [pairset.images[i] for i in used], remap[pairs],
                   pairset.issame[keep], pairset.aligned, ids, dict(pairset.notes, subset_pairs=len(keep)))

"""Teacher embeddings for distillation: an npz (``paths``, ``emb``[, ``emb_flip``, ``found``]) matched to the
samples of a dataset by path, or through ``make_aligned.py``'s ``manifest.csv`` by the crop's source photo."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.errors import DatasetError


def _map_through_manifest(row: dict[str, int], keys: Sequence[str], root: Path | None) -> None:
    """Crops made by make_aligned.py: find a teacher row by the crop's source photo (``manifest.csv``
    maps ``output`` → ``source``), exactly or as a path suffix (the teacher may carry a prefix)."""
    manifest = root / "manifest.csv" if root else None
    if manifest is None or not manifest.is_file() or all(k in row for k in keys):
        return
    with open(manifest, newline="") as f:
        source_of = {r["output"]: r["source"] for r in csv.DictReader(f) if r.get("output")}
    by_suffix: dict[str, int] = {}
    for p, i in row.items():
        parts = p.split("/")
        for j in range(len(parts)):
            by_suffix.setdefault("/".join(parts[j:]), i)
    for k in keys:
        src = source_of.get(k)
        if k not in row and src is not None and src in by_suffix:
            row[k] = by_suffix[src]


def load_teacher_embeddings(path: Path, keys: Sequence[str], root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``(emb, emb_flip)`` rows for ``keys`` (dataset order); samples whose teacher found no face get zeros
    (a constant, gradient-free distillation term), with one warning."""
    if not path.is_file():
        raise DatasetError(f"teacher embeddings not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("paths", "emb") if k not in z.files]
        if missing:
            raise DatasetError(f"{path}: teacher npz lacks {', '.join(missing)} (needs paths, emb[, emb_flip])")
        paths = [str(p) for p in z["paths"]]
        emb = z["emb"].astype(np.float32)
        emb_flip = z["emb_flip"].astype(np.float32) if "emb_flip" in z.files else emb
        found = z["found"].astype(bool) if "found" in z.files else None
    if len(paths) != len(emb) or emb.shape != emb_flip.shape:
        raise DatasetError(f"{path}: paths, emb and emb_flip disagree in length/shape")
    row = {p: i for i, p in enumerate(paths)}
    _map_through_manifest(row, keys, root)
    missing = [k for k in keys if k not in row]
    if missing:
        raise DatasetError(f"{path}: no teacher embedding for {len(missing)} of {len(keys)} samples "
                           f"(e.g. {missing[0]!r}); its paths must be relative to the dataset root as listed")
    take = np.array([row[k] for k in keys])
    emb, emb_flip = emb[take], emb_flip[take]
    bad = ~(np.isfinite(emb).all(1) & np.isfinite(emb_flip).all(1))
    if found is not None:
        bad |= ~found[take]
    if bad.any():
        warnings.warn(f"{path}: {int(bad.sum())} of {len(bad)} samples have no usable teacher embedding "
                      f"(teacher found no face); they are not distilled", stacklevel=4)
        emb[bad] = 0.0
        emb_flip[bad] = 0.0
    return emb, emb_flip

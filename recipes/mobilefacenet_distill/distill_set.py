"""Join aligned crops (``make_aligned.py`` output) with teacher embeddings (``teacher_dlib.py`` output).

Writes one list file (``path identity``, paths relative to ``--root``) and one teacher npz keyed by the same
paths, ready for a distillation config (``data.list`` / ``data.teacher``). A teacher vector is kept only when
the teacher embedded the same face the crop shows (box centres closer than half the crop's box width);
otherwise the crop stays in the list for the identity loss but gets no teacher vector (zeros). Teacher
vectors are centred on their mean and re-normalised (see :func:`center_teacher`).

    python -m recipes.mobilefacenet_distill.distill_set --root work_data --out work_data/celeba_distill \
        --part celeba_wild_112:teacher_wild.npz:wild --part celeba_aligned_112:teacher_aligned.npz:aligned_89x109
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.files import atomic_write, atomic_write_bytes
from runtime.preprocess import l2_normalize


def _box(text: str) -> np.ndarray:
    vals = [float(v) for v in text.split()] if text else []
    return np.array(vals[:4], np.float32) if len(vals) >= 4 else np.full(4, np.nan, np.float32)


def same_face(crop_box: np.ndarray, teacher_box: np.ndarray) -> bool:
    """True when the teacher's face box is centred on the crop's face box."""
    if not (np.all(np.isfinite(crop_box)) and np.all(np.isfinite(teacher_box))):
        return False
    c1 = (crop_box[:2] + crop_box[2:]) / 2
    c2 = (teacher_box[:2] + teacher_box[2:]) / 2
    return float(np.linalg.norm(c1 - c2)) < 0.5 * float(crop_box[2] - crop_box[0])


@dataclass(frozen=True)
class CropFace:
    """One make_aligned crop and the teacher's view of its source photo (``row`` < 0: no usable teacher face)."""

    crop: str  # path relative to the join root
    identity: str
    source: str  # the photo, as the teacher npz names it
    row: int
    box: tuple[float, float, float, float] | None  # the teacher's face box in the photo


def match_part(root: Path, aligned_dir: str, teacher: dict, source_prefix: str) -> list[CropFace]:
    """The ``ok`` crops of one make_aligned folder, each matched to its teacher row (see :func:`same_face`)."""
    index = {str(p): i for i, p in enumerate(teacher["paths"])}
    out = []
    with open(root / aligned_dir / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["status"] != "ok":
                continue
            key = os.path.join(source_prefix, r["source"]) if source_prefix else r["source"]
            i = index.get(key)
            ok = i is not None and bool(teacher["found"][i]) and same_face(_box(r["box"]), teacher["box"][i])
            out.append(CropFace(f"{aligned_dir}/{r['output']}", r["identity"], key, i if ok else -1,
                                tuple(float(v) for v in teacher["box"][i]) if ok else None))
    return out


def load_teacher(path: Path) -> dict:
    """A teacher_dlib.py npz as a dict of arrays (one read each, not one per row)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("paths", "emb", "emb_flip", "box", "found")}


def parse_part(part: str) -> tuple[str, str, str]:
    """``ALIGNED_DIR:TEACHER_NPZ:SOURCE_PREFIX`` (the ``--part`` option; missing fields are empty)."""
    aligned, teacher_npz, prefix = (part.split(":") + ["", ""])[:3]
    return aligned, teacher_npz, prefix


def join_part(root: Path, aligned_dir: str, teacher_npz: str, source_prefix: str):
    """Rows (path, identity, emb, emb_flip) for one make_aligned output folder and its teacher file."""
    t = load_teacher(root / teacher_npz)
    zero = np.zeros(t["emb"].shape[1], np.float32)
    return [(c.crop, c.identity, t["emb"][c.row].copy() if c.row >= 0 else zero,
             t["emb_flip"][c.row].copy() if c.row >= 0 else zero)
            for c in match_part(root, aligned_dir, t, source_prefix)]


def center_teacher(emb: np.ndarray, emb_flip: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subtract the teacher's mean embedding and re-normalise (zero rows stay zero).

    dlib's descriptors share a large common component (different people have cosine ≈ 0.9), so a cosine
    distillation loss on raw vectors mostly teaches that common direction; centred, different people sit
    near cosine 0 and the loss is spent on what tells people apart.
    """
    have = np.linalg.norm(emb, axis=1) > 0
    center = emb[have].mean(0) if have.any() else np.zeros(emb.shape[1], np.float32)
    out = []
    for e in (emb, emb_flip):
        c = np.where(have[:, None], e - center, 0.0)
        out.append(l2_normalize(c))
    return out[0], out[1], center.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="folder holding the aligned folders and teacher files")
    ap.add_argument("--part", action="append", required=True, help="ALIGNED_DIR:TEACHER_NPZ:SOURCE_PREFIX")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.txt and STEM_teacher.npz")
    args = ap.parse_args(argv)
    rows = []
    for part in args.part:
        rows += join_part(args.root, *parse_part(part))
    paths = np.array([r[0] for r in rows])
    emb = np.stack([r[2] for r in rows]).astype(np.float32)
    emb_flip = np.stack([r[3] for r in rows]).astype(np.float32)
    emb, emb_flip, center = center_teacher(emb, emb_flip)
    text = "".join(f"{p} {r[1]}\n" for p, r in zip(paths, rows))
    atomic_write_bytes(args.out.with_name(args.out.name + ".txt"), text.encode())
    atomic_write(args.out.with_name(args.out.name + "_teacher.npz"),
                 lambda f: np.savez(f, paths=paths, emb=emb, emb_flip=emb_flip, center=center))
    have = int((np.linalg.norm(emb, axis=1) > 0).sum())
    ids = len({r[1] for r in rows})
    print(f"distill set: {len(rows)} crops, {ids} identities, {have} with a teacher vector -> {args.out}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The gallery file: one ``.npz`` (no pickle) with ``embeddings`` (float32 M×D), ``owner`` (int32 person index
per row) and ``meta`` (UTF-8 JSON as uint8 bytes: format, version, names, threshold, dim, count, index
settings and a SHA-256 of the arrays), written atomically; read back with every field checked.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .files import atomic_write, existing_file, pid_temp_prefix, remove_stale_temporaries

FORMAT = "facekit-gallery"
VERSION = 1


class GalleryError(ValueError):
    """A gallery file is missing, corrupt or of an unknown format; or an enrolment is invalid."""


def digest(emb: np.ndarray, owner: np.ndarray) -> str:
    """SHA-256 of the gallery's arrays (what the file's meta and its saved index are bound to)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(emb, np.float32).data)  # the buffer itself: no copy of a large gallery
    h.update(np.ascontiguousarray(owner, np.int32).data)
    return h.hexdigest()


def write_gallery(path: str | os.PathLike, emb: np.ndarray, owner: np.ndarray, fields: dict,
                  sha: str | None = None) -> str:
    """Write the gallery file atomically (``fields``: names, threshold, dim, index); returns the arrays' SHA-256
    (``sha`` when the caller has computed it already)."""
    path = Path(path)
    emb = np.ascontiguousarray(emb, np.float32)
    owner = np.ascontiguousarray(owner, np.int32)
    sha = sha or digest(emb, owner)
    meta = {"format": FORMAT, "version": VERSION, **fields, "names": list(fields["names"]), "count": int(len(emb)),
            "sha256": sha}
    meta_bytes = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), np.uint8)
    atomic_write(path, lambda f: np.savez(f, embeddings=emb, owner=owner, meta=meta_bytes),
                 tmp_prefix=pid_temp_prefix(path))
    remove_stale_temporaries(path)
    return sha


def read_gallery(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(embeddings, owner, meta)`` of a gallery file; :class:`GalleryError` if missing, corrupt or foreign."""
    path = existing_file(path, GalleryError, "gallery file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"embeddings", "owner", "meta"} - set(z.files)
            if missing:
                raise GalleryError(f"{path}: not a facekit gallery (missing {', '.join(sorted(missing))})")
            emb, owner, meta_bytes = z["embeddings"], z["owner"], z["meta"]
        meta = json.loads(meta_bytes.tobytes().decode("utf-8"))
    except GalleryError:
        raise
    except Exception as e:  # noqa: BLE001 - an untrusted file: any failure is "cannot read"
        raise GalleryError(f"{path}: cannot read gallery ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GalleryError(f"{path}: not a facekit gallery")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise GalleryError(f"{path}: gallery format version {meta.get('version')!r} is newer than this "
                           f"runtime ({VERSION})")
    names = meta.get("names")
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise GalleryError(f"{path}: corrupt gallery (bad name list)")
    if emb.dtype != np.float32 or emb.ndim != 2 or owner.ndim != 1 or owner.dtype.kind not in "iu" \
            or len(owner) != len(emb) \
            or meta.get("count") != len(emb) or (len(emb) and (owner.min() < 0 or owner.max() >= len(names))):
        raise GalleryError(f"{path}: corrupt gallery (arrays do not match the name list)")
    owner = owner.astype(np.int32, copy=False)
    if meta.get("sha256") != digest(emb, owner):
        raise GalleryError(f"{path}: corrupt gallery (checksum mismatch)")
    thr, dim = meta.get("threshold"), meta.get("dim")
    if not (thr is None or isinstance(thr, (int, float))) or not (dim is None or isinstance(dim, int)) \
            or (len(emb) and dim != emb.shape[1]):
        raise GalleryError(f"{path}: corrupt gallery (bad threshold or dimension)")
    counts = np.bincount(owner.astype(np.int64), minlength=len(names))
    if (counts == 0).any():
        raise GalleryError(f"{path}: corrupt gallery (a person without embeddings)")
    return emb, owner, meta

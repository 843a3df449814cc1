"""The index file saved beside a gallery file, bound to it by checksum; never trusted when it does not match.

``people.npz`` whose arrays hash to ``sha`` gets ``people.npz.index-<sha[:16]>``. A save writes the new index
first, then the gallery, then deletes the other index files beside it, each write atomic
(``runtime.files.atomic_write``): whenever a save is killed, the gallery file on disk (old or new) still has
its own index beside it. Layout, streamed so that no second copy of the index is held in memory::

    MAGIC | id map (int32 × ids) | faiss index (faiss.write_index) | meta (UTF-8 JSON) | len(meta) u64 LE | MAGIC

``meta`` holds the format, the index kind and build settings, the counts, the SHA-256 of the gallery's arrays
it was built for (``gallery_sha256``) and ``seal``: the SHA-256 of everything before the meta plus the meta
itself (without ``seal``). :func:`read_index` refuses (:class:`StaleIndex`, with the reason) a file that is
missing, cut, sealed wrongly (tampered or damaged), built for other gallery contents or other build settings,
or whose id map does not cover the gallery's rows exactly once; the gallery then rebuilds the index. After
loading, a few rows are looked up in the index, which must find them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .files import atomic_write
from .gallery_index import AnnIndex, IndexKeeper, IndexSpec, IndexView, require_faiss

MAGIC = b"FKGIDX\x00\x01"
FORMAT = "facekit-gallery-index"
VERSION = 1
INFIX = ".index-"
_CHUNK = 1 << 20
log = logging.getLogger("facekit.gallery")


class StaleIndex(Exception):
    """The index file cannot be used for this gallery (the message says why); rebuild it."""


def index_path(gallery_path: str | os.PathLike, gallery_sha256: str) -> Path:
    """Where the index of the gallery file ``gallery_path`` with arrays hashing to ``gallery_sha256`` lives."""
    p = Path(gallery_path)
    return p.with_name(f"{p.name}{INFIX}{gallery_sha256[:16]}")


def index_files(gallery_path: str | os.PathLike) -> list[Path]:
    """The index files beside the gallery file (normally one: its own)."""
    p = Path(gallery_path)
    return sorted(p.parent.glob(f"{glob_escape(p.name)}{INFIX}*"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def remove_other_indexes(gallery_path: str | os.PathLike, gallery_sha256: str | None) -> None:
    """Delete index files beside the gallery file except its own (``gallery_sha256``; None: delete all)."""
    keep = None if gallery_sha256 is None else index_path(gallery_path, gallery_sha256)
    for p in index_files(gallery_path):
        if p != keep:
            try:
                p.unlink()
            except OSError:
                pass


def _seal(payload_sha: str, meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256((payload_sha + json.dumps(body, sort_keys=True)).encode()).hexdigest()


def write_index(path: str | os.PathLike, ann: AnnIndex, gallery_sha256: str, rows: int, tmp_prefix: str) -> Path:
    """Save ``ann`` (the index of a gallery of ``rows`` rows whose arrays hash to ``gallery_sha256``) atomically.

    ``tmp_prefix``: the gallery file's :func:`~runtime.files.pid_temp_prefix`, so that cleaning up after the
    gallery's killed writers (``remove_stale_temporaries(gallery)``) also removes their index temporaries."""
    faiss = require_faiss()
    path = Path(path)

    def write(f: BinaryIO) -> None:
        h = hashlib.sha256()
        sizes = {"index_bytes": 0}

        def out(data) -> None:
            h.update(data)
            f.write(data)

        def out_index(data) -> None:
            sizes["index_bytes"] += len(data)
            out(data)

        out(MAGIC)
        out(np.ascontiguousarray(ann.view().ids, "<i4").tobytes())
        with ann.lock.reading():
            faiss.write_index(ann.index, faiss.PyCallbackIOWriter(out_index))
            ntotal = int(ann.index.ntotal)
        meta = {"format": FORMAT, "version": VERSION, "kind": ann.kind, "build": ann.spec.build_settings(),
                "dim": int(ann.index.d), "ids": ann.n_ids, "dead": ann.dead, "rows": int(rows), "ntotal": ntotal,
                "built_rows": ann.built_rows, "index_bytes": sizes["index_bytes"], "gallery_sha256": gallery_sha256}
        meta["seal"] = _seal(h.hexdigest(), meta)
        blob = json.dumps(meta).encode("utf-8")
        f.write(blob + struct.pack("<Q", len(blob)) + MAGIC)

    atomic_write(path, write, tmp_prefix=tmp_prefix)
    return path


def _read_meta(f: BinaryIO, size: int) -> tuple[dict, int]:
    """The meta dict and where it starts; StaleIndex when the file is not a whole index file."""
    tail = len(MAGIC) + 8
    if size < 2 * len(MAGIC) + 8:
        raise StaleIndex("too short to be an index file")
    f.seek(size - tail)
    (meta_len,), magic = struct.unpack("<Q", f.read(8)), f.read(len(MAGIC))
    start = size - tail - meta_len
    if magic != MAGIC or start < len(MAGIC):
        raise StaleIndex("not a facekit index file, or cut short")
    f.seek(start)
    try:
        meta = json.loads(f.read(meta_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StaleIndex("unreadable meta") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StaleIndex("not an index file of this format version")
    return meta, start


def _payload_sha(f: BinaryIO, length: int) -> str:
    h = hashlib.sha256()
    f.seek(0)
    left = length
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise StaleIndex("cut short")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


class _Bounded:
    """A reader that stops at ``limit`` bytes (faiss must not read into the meta)."""

    def __init__(self, f: BinaryIO, limit: int):
        self.f, self.left = f, limit

    def read(self, n: int) -> bytes:
        data = self.f.read(max(0, min(n, self.left)))
        self.left -= len(data)
        return data


def read_index(path: str | os.PathLike, spec: IndexSpec, kind: str, gallery_sha256: str, rows: int,
               embeddings: np.ndarray) -> AnnIndex:
    """The saved index of this gallery, checked (see the module docstring); StaleIndex(reason) otherwise."""
    faiss = require_faiss()
    path = Path(path)
    if not path.is_file():
        raise StaleIndex("no index file")
    with open(path, "rb") as f:
        meta, meta_start = _read_meta(f, path.stat().st_size)
        if meta.get("seal") != _seal(_payload_sha(f, meta_start), meta):
            raise StaleIndex("checksum mismatch (damaged or modified)")
        if meta.get("gallery_sha256") != gallery_sha256 or meta.get("rows") != rows:
            raise StaleIndex("built for other gallery contents")
        if meta.get("kind") != kind or meta.get("build") != spec.build_settings():
            raise StaleIndex(f"built as {meta.get('kind')} {meta.get('build')}, wanted {kind} {spec.build_settings()}")
        n_ids = int(meta["ids"])
        if len(MAGIC) + 4 * n_ids + int(meta["index_bytes"]) != meta_start:
            raise StaleIndex("section sizes do not add up")
        f.seek(0)
        if f.read(len(MAGIC)) != MAGIC:
            raise StaleIndex("not a facekit index file")
        ids = np.frombuffer(f.read(4 * n_ids), "<i4").astype(np.int32)
        index = faiss.read_index(faiss.PyCallbackIOReader(_Bounded(f, int(meta["index_bytes"])).read))
    _check_ids(ids, rows)
    ann = AnnIndex(spec, kind, index, ids, int(meta.get("built_rows", rows)))
    if ann.index.d != embeddings.shape[1] or ann.index.ntotal != n_ids:
        raise StaleIndex("index size does not match its id map")
    _spot_check(ann, embeddings)
    return ann


def _check_ids(ids: np.ndarray, rows: int) -> None:
    alive = ids[ids >= 0]
    if len(alive) != rows or (rows and (alive.max() >= rows or np.bincount(alive, minlength=rows).max() != 1)):
        raise StaleIndex("id map does not cover the gallery's rows exactly once")


def _spot_check(ann: AnnIndex, embeddings: np.ndarray, probes: int = 8) -> None:
    """Look a few rows up: a working index of this gallery finds (almost) all of them."""
    n = len(embeddings)
    picks = np.random.default_rng(n).choice(n, min(probes, n), replace=False)
    view = ann.view()
    found = 0
    for row in picks.tolist():
        sims, _ = view.search(embeddings, embeddings[row], 1)
        found += bool(len(sims)) and sims[0] >= 1 - 1e-4
    if found * 2 < len(picks):
        raise StaleIndex(f"finds only {found} of {len(picks)} gallery rows looked up")


def saved_spec(saved: Any, requested: Any, path: Path) -> IndexSpec:
    """The index settings to load a gallery with: ``requested``, else the saved ones (``auto`` if none), exact
    with a warning when the saved ones need faiss and it is missing. GalleryIndexError when they are invalid."""
    if requested is not None:
        return IndexSpec.parse(requested)
    try:
        return IndexSpec.parse(saved if saved is not None else "auto")
    except ImportError:
        log.warning("%s: saved with index %r, but faiss is not installed: searching exactly", path,
                    saved.get("kind") if isinstance(saved, dict) else saved)
        return IndexSpec.parse("exact")


def load_saved_index(keeper: IndexKeeper, path: Path, gallery_sha256: str,
                     embeddings: np.ndarray) -> tuple[IndexView | None, dict]:
    """Give ``keeper`` the index saved beside the gallery file ``path`` if it is this gallery's, else a new one
    (when the size needs one); returns the view to publish and what happened, with timings."""
    kind = keeper.spec.ann_kind(len(embeddings))
    if kind is None:
        keeper.ann = None
        return None, {"index": "exact"}
    t0 = time.perf_counter()
    source, reason = "file", None
    try:
        keeper.ann = read_index(index_path(path, gallery_sha256), keeper.spec, kind, gallery_sha256, len(embeddings), embeddings)
    except Exception as e:  # noqa: BLE001 - an index file is never trusted: any failure means rebuild
        reason = str(e) if isinstance(e, StaleIndex) else f"unreadable ({type(e).__name__}: {e})"
        keeper.ann = AnnIndex.build(keeper.spec, kind, embeddings)
        source = "built"
        missing = reason == "no index file"
        (log.info if missing else log.warning)("%s: %s index %s (%s); built a new one in %.1f s", path, kind,
                                               "missing" if missing else "not used", reason, time.perf_counter() - t0)
    return keeper.view(), {"index": kind, "index_source": source, "index_rebuild_reason": reason,
                           "index_seconds": round(time.perf_counter() - t0, 3)}

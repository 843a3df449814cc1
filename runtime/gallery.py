"""A face gallery: enrol people, identify faces with unknown rejection, save and load safely.

Matching rule: each person may hold several embeddings; a query's similarity to a person is its **best**
cosine similarity over that person's embeddings (nearest neighbour, not a mean template — it keeps
profile and frontal enrolments useful and is what exact search gives for free).

Unknown rejection: :meth:`Gallery.identify` returns ``(name, similarity)`` pairs, best first; a pair whose
similarity is below the threshold has ``name`` None (:data:`UNKNOWN`). The threshold is the gallery's own
when set, else the one the recognizer model carries (``FacePipeline.threshold``).

Memory: embeddings live in an append-only buffer that grows by doubling, so enrolling one person costs
O(its rows), not a copy of the gallery; ``remove`` compacts (one copy).

Storage: one ``.npz`` file (no pickle; :mod:`runtime.gallery_file`) holding ``embeddings`` (float32 M×D),
``owner`` (int32 person index per row) and ``meta`` (JSON: names, threshold, dim, index settings and a
SHA-256 of the arrays). One file means names and vectors can never disagree; it is written atomically (temporary file in the same folder, fsync, ``os.replace``, fsync of the
folder), so a process killed during :meth:`Gallery.save` leaves the previous gallery intact.

Thread safety: the state is an immutable snapshot replaced under a lock (copy-on-write); ``identify``
reads one snapshot and never sees a half-finished enrolment. Enrolments write only buffer rows past every
published snapshot, then publish a new snapshot.

Search: ``Gallery(index="exact" | "hnsw" | "ivf" | "auto")`` (default ``auto``: exact for small galleries,
a faiss HNSW index from :data:`~runtime.gallery_index.AUTO_ANN_MIN_ROWS` rows on); see
:mod:`runtime.gallery_index` for the kinds, exact re-ranking and how enrolment and removal update an index.
The index is kept current by ``enroll`` / ``remove`` (built when the gallery reaches the size that needs
it), saved beside the gallery (``<file>.index-<checksum>``, :mod:`runtime.gallery_index_file`) and, on
``load``, used only when it was built for exactly this gallery; otherwise it is rebuilt.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .files import pid_temp_prefix
from .gallery_file import GalleryError, digest, read_gallery, write_gallery
from .gallery_index import GalleryIndexError, IndexKeeper, IndexSpec, IndexView, exact_search
from .gallery_index_file import index_path, load_saved_index, remove_other_indexes, saved_spec, write_index
from .preprocess import l2_normalize

UNKNOWN = None
#: Loads of galleries with at least this many rows are logged at INFO with their timings.
LOG_LOAD_MIN_ROWS = 100_000
log = logging.getLogger("facekit.gallery")


@dataclass(frozen=True)
class _Snapshot:
    """One immutable view of the gallery.

    ``embeddings``/``owner`` are read-only views of the first rows of append-only buffers, and the
    snapshot sees the first ``people`` entries of an append-only name list (and of the name → index
    map). Enrolments only append past what a published snapshot sees, so a snapshot never changes and an
    enrolment costs O(its own rows). ``remove`` builds fresh buffers instead.
    """

    all_names: list = field(default_factory=list, compare=False)
    people: int = 0
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # person index of each row
    max_rows: int = 0  # most rows held by one person
    lookup: dict = field(default_factory=dict, compare=False)  # name -> person index (may run ahead)
    ann: IndexView | None = field(default=None, compare=False)  # approximate index, None: exact search

    @property
    def names(self) -> list[str]:
        return self.all_names[: self.people]

    def person(self, name: str) -> int | None:
        i = self.lookup.get(name)
        return i if i is not None and i < self.people else None

    def enrolled(self, name: str) -> int:
        """The person number of ``name``; KeyError if not enrolled."""
        person = self.person(name)
        if person is None:
            raise KeyError(f"{name!r} is not enrolled")
        return person

    def rows(self, person: int) -> np.ndarray:
        return self.embeddings[self.owner == person]


def _freeze(names: list, people: int, emb: np.ndarray, owner: np.ndarray, max_rows: int, lookup: dict,
            ann: IndexView | None = None) -> _Snapshot:
    emb, owner = emb.view(), owner.view()
    emb.setflags(write=False)
    owner.setflags(write=False)
    return _Snapshot(names, people, emb, owner, int(max_rows), lookup, ann)


def _fresh(names: Sequence[str], emb: np.ndarray, owner: np.ndarray,
           ann: IndexView | None = None) -> tuple[_Snapshot, list[int]]:
    """A snapshot on new (unshared) arrays and lists, plus the per-person row counts."""
    names = list(names)
    counts = np.bincount(owner.astype(np.int64), minlength=len(names)).tolist() if len(names) else []
    snap = _freeze(names, len(names), np.ascontiguousarray(emb, np.float32), np.ascontiguousarray(owner, np.int32),
                   max(counts, default=0), {n: i for i, n in enumerate(names)}, ann)
    return snap, counts


class Gallery:
    """Enrolled people and their face embeddings (see the module docstring for the rules)."""

    def __init__(self, threshold: float | None = None, dim: int | None = None, pipeline: Any = None,
                 index: "str | IndexSpec | dict" = "auto"):
        self.threshold = None if threshold is None else float(threshold)
        self.dim = None if dim is None else int(dim)
        self.pipeline = pipeline
        self.load_info: dict = {}  # timings of :meth:`load`
        self._lock = threading.Lock()
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None  # (embeddings, owner) with spare rows
        self._counts: list[int] = []  # rows per person (writer side, under the lock)
        self._index = IndexKeeper(IndexSpec.parse(index))  # ImportError naming the faiss extra if needed
        self._state = _Snapshot()

    # ------------------------------------------------------------------------------------- queries

    @property
    def names(self) -> list[str]:
        """Enrolled people, in enrolment order."""
        return list(self._state.names)  # a copy

    def __len__(self) -> int:
        return self._state.people

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._state.person(name) is not None

    def __repr__(self) -> str:
        s = self._state
        return f"Gallery({s.people} people, {len(s.embeddings)} embeddings, dim={self.dim}, threshold={self.threshold})"

    def embeddings(self, name: str) -> np.ndarray:
        """A copy of the L2-normalised embeddings enrolled for ``name``."""
        s = self._state
        return s.rows(s.enrolled(name)).copy()

    @property
    def num_embeddings(self) -> int:
        return len(self._state.embeddings)

    @property
    def index_kind(self) -> str:
        """The search in use now: "exact", "hnsw" or "ivf" (``auto`` and small galleries search exactly)."""
        ann = self._state.ann
        return "exact" if ann is None else ann.ann.kind

    # ------------------------------------------------------------------------------------ changes

    def enroll(self, name: str, images_or_embeddings: Any, pipeline: Any = None) -> int:
        """Add faces of ``name``; returns how many embeddings were added.

        Items are embeddings (a float 1-D vector, or a float 2-D array of one vector per row; they are
        L2-normalised here) or images (path, bytes or image array), which need a ``pipeline``
        (``FacePipeline``; remembered for later ``identify`` calls): the subject face (big and central, see runtime.subject) of each image is
        used, and an image without a face is an error naming it. Enrolling an existing name adds to it.
        """
        if not isinstance(name, str) or not name.strip():
            raise GalleryError(f"a person's name must be a non-empty string, got {name!r}")
        if pipeline is not None:
            self.pipeline = pipeline
        vectors = self._to_embeddings(images_or_embeddings, pipeline or self.pipeline)
        if len(vectors) == 0:
            raise GalleryError(f"nothing to enrol for {name!r}")
        self._append([name], np.zeros(len(vectors), np.int64), vectors)
        return len(vectors)

    def enroll_many(self, names: Sequence[str], embeddings: Any) -> int:
        """Enrol many embeddings at once: ``names[i]`` owns row ``i`` of ``embeddings`` (N×D; names may repeat).

        One snapshot and one index update for all rows: the way to import a large gallery. Returns N.
        """
        vectors = _normalise(np.asarray(embeddings, np.float32), "embeddings")
        names = list(names)
        if len(names) != len(vectors):
            raise GalleryError(f"{len(names)} names for {len(vectors)} embeddings")
        slot: dict[str, int] = {}
        local = np.fromiter((slot.setdefault(n, len(slot)) for n in names), np.int64, len(names))
        for n in slot:
            if not isinstance(n, str) or not n.strip():
                raise GalleryError(f"a person's name must be a non-empty string, got {n!r}")
        self._append(list(slot), local, vectors)
        return len(vectors)

    def _append(self, new_names: list[str], local_owner: np.ndarray, vectors: np.ndarray) -> None:
        """Publish ``vectors`` as rows of ``new_names[local_owner[i]]``: one new snapshot, one index update."""
        with self._lock:
            if self.dim is None:
                self.dim = vectors.shape[1]
            elif vectors.shape[1] != self.dim:
                raise GalleryError(f"embeddings for {new_names[0]!r} have {vectors.shape[1]} dimensions, "
                                   f"the gallery has {self.dim}")
            s = self._state
            n, k = len(s.owner), len(vectors)
            if self._buffers is None or n + k > len(self._buffers[1]):  # grow (amortised doubling)
                cap = max(64, 2 * (n + k))
                emb_buf, own_buf = np.empty((cap, self.dim), np.float32), np.empty(cap, np.int32)
                if n:
                    emb_buf[:n], own_buf[:n] = s.embeddings, s.owner
                self._buffers = (emb_buf, own_buf)
            emb_buf, own_buf = self._buffers
            emb_buf[n:n + k] = vectors  # rows no published snapshot can see yet
            ann = self._index.update(emb_buf[:n + k], added_from=n)
            del s.all_names[s.people:]  # defensive: nothing past ``people`` is ever published
            people = []
            for name in new_names:  # append to the shared name list: older snapshots see only their prefix
                person = s.person(name)
                if person is None:
                    person = len(s.all_names)
                    s.all_names.append(name)
                    s.lookup[name] = person
                    self._counts.append(0)
                people.append(person)
            max_rows = s.max_rows
            for person, rows in zip(people, np.bincount(local_owner, minlength=len(people)).tolist()):
                self._counts[person] += rows
                max_rows = max(max_rows, self._counts[person])
            own_buf[n:n + k] = np.asarray(people, np.int32)[local_owner]
            self._state = _freeze(s.all_names, len(s.all_names), emb_buf[:n + k], own_buf[:n + k], max_rows,
                                  s.lookup, ann)

    def remove(self, name: str) -> int:
        """Forget ``name``; returns how many embeddings were removed. KeyError if not enrolled."""
        with self._lock:
            s = self._state
            drop = s.enrolled(name)
            keep = s.owner != drop
            owner = s.owner[keep]
            owner = owner - (owner > drop).astype(np.int32)  # renumber the people after ``drop``
            removed = len(s.owner) - len(owner)
            names = s.names
            del names[drop]
            emb = s.embeddings[keep]
            ann = self._index.update(emb, keep=keep)
            self._buffers = None  # fresh arrays and lists: older snapshots keep theirs untouched
            self._state, self._counts = _fresh(names, emb, owner, ann)
        return removed

    def set_index(self, index: "str | IndexSpec | dict") -> None:
        """Search with ``index`` from now on: builds it now when the gallery is big enough for it; a change of
        search settings only (``ef_search``, ``nprobe``, ``candidates``) keeps the built index."""
        spec = IndexSpec.parse(index)
        with self._lock:
            s = self._state
            view = self._index.respec(spec, s.embeddings)
            self._state = _freeze(s.all_names, s.people, s.embeddings, s.owner, s.max_rows, s.lookup, view)

    @property
    def index_spec(self) -> IndexSpec:
        """The search settings (kind, build and search parameters)."""
        return self._index.spec

    # ----------------------------------------------------------------------------------- identify

    def identify(self, image_or_embedding: Any, top_k: int = 1, pipeline: Any = None,
                 threshold: float | None = None) -> list[tuple[str | None, float]]:
        """The ``top_k`` best-matching people as ``(name, similarity)``, best first.

        A name is None (unknown) when its similarity is below the threshold (``threshold`` argument,
        else the gallery's, else the pipeline model's). An embedding query is L2-normalised; an image
        query uses its subject face and returns ``[]`` when it has no face. An empty gallery answers
        ``[(None, -1.0)]``.
        """
        if int(top_k) < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        pipe = pipeline or self.pipeline
        thr = self._resolve_threshold(threshold, pipe)
        if _is_embedding(image_or_embedding):
            q = _unit_query(image_or_embedding)
        else:
            faces = self._subject_faces([image_or_embedding], pipe, allow_missing=True)
            if not faces:
                return []
            q = faces[0]
        s = self._state  # one consistent snapshot for the whole query
        if s.people == 0:
            return [(UNKNOWN, -1.0)]
        if q.shape[0] != s.embeddings.shape[1]:
            raise GalleryError(f"query has {q.shape[0]} dimensions, the gallery has {s.embeddings.shape[1]}")
        best = self._person_scores(s, q, int(top_k))
        order = sorted(best.items(), key=lambda kv: -kv[1])[: int(top_k)]
        return [(s.all_names[i] if sim >= thr else UNKNOWN, float(sim)) for i, sim in order]

    def _person_scores(self, s: _Snapshot, q: np.ndarray, top_k: int) -> dict[int, float]:
        """Best similarity per person, for the people that can make the top ``top_k``.

        The ``top_k × (most rows of one person)`` best rows always contain the best row of each of the
        ``top_k`` best people, so only those rows are reduced to people.
        """
        k = min(len(s.owner), top_k * s.max_rows)
        if s.ann is not None:
            sims, rows = s.ann.search(s.embeddings, q, k)
        else:
            sims, rows = exact_search(s.embeddings, q, k)
        best: dict[int, float] = {}
        for sim, owner in zip(sims.tolist(), s.owner[rows].tolist()):
            best.setdefault(owner, sim)  # sorted: the first row of a person is its best
            if len(best) == top_k:
                break
        return best

    def _resolve_threshold(self, threshold: float | None, pipeline: Any) -> float:
        for value in (threshold, self.threshold, _pipeline_threshold(pipeline)):
            if value is not None:
                return float(value)
        raise GalleryError("no threshold: pass Gallery(threshold=...) or a pipeline whose recognizer carries one")

    # -------------------------------------------------------------------------------- embeddings

    def _to_embeddings(self, items: Any, pipeline: Any) -> np.ndarray:
        if _is_embedding(items):
            arr = np.asarray(items, np.float32)
            return _normalise(arr.reshape(1, -1) if arr.ndim == 1 else arr, "embedding")
        if isinstance(items, (str, os.PathLike, bytes, bytearray)) or (isinstance(items, np.ndarray)):
            items = [items]
        elif not isinstance(items, Iterable):
            raise GalleryError(f"expected images or embeddings, got {type(items).__name__}")
        vectors = []
        images = []
        for item in items:
            if _is_embedding(item):
                arr = np.asarray(item, np.float32)
                vectors.append(_normalise(arr.reshape(1, -1) if arr.ndim == 1 else arr, "embedding"))
            else:
                images.append(item)
        if images:
            vectors.append(np.stack(self._subject_faces(images, pipeline, allow_missing=False)))
        if not vectors:
            return np.zeros((0, self.dim or 0), np.float32)
        dims = {v.shape[1] for v in vectors}
        if len(dims) > 1:
            raise GalleryError(f"embeddings of different sizes {sorted(dims)} in one enrolment")
        return np.concatenate(vectors, 0)

    @staticmethod
    def _subject_faces(images: Iterable[Any], pipeline: Any, allow_missing: bool) -> list[np.ndarray]:
        """The embedding of the subject face of each image (``FacePipeline.subject_face``)."""
        if pipeline is None:
            raise GalleryError("images need a pipeline: enroll(name, images, pipeline=FacePipeline()) "
                               "or pass embeddings")
        from .faces import NoFaceError

        out = []
        for image in images:
            try:
                face = pipeline.subject_face(image)
            except NoFaceError:
                if allow_missing:
                    continue
                raise GalleryError(f"{_label(image)}: no face found") from None
            out.append(_normalise(np.asarray(face.embedding, np.float32).reshape(1, -1), _label(image))[0])
        return out

    # ---------------------------------------------------------------------------------- save/load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the gallery to ``path`` (one .npz) atomically; returns the path.

        Its approximate index, if it has one, is written first, beside it and named by the gallery's checksum
        (:mod:`runtime.gallery_index_file`); older index files go after the gallery is in place. Enrolments
        wait meanwhile."""
        path = Path(path)
        with self._lock:  # the index written must be the index of exactly these rows
            s = self._state
            sha = digest(s.embeddings, s.owner)
            if self._index.ann is not None:
                write_index(index_path(path, sha), self._index.ann, sha, len(s.embeddings), pid_temp_prefix(path))
            write_gallery(path, s.embeddings, s.owner, {"names": s.names, "threshold": self.threshold,
                                                        "dim": self.dim, "index": self.index_spec.to_dict()}, sha)
            remove_other_indexes(path, sha if self._index.ann is not None else None)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, pipeline: Any = None,
             index: "str | IndexSpec | dict | None" = None) -> "Gallery":
        """Read a gallery written by :meth:`save`; :class:`GalleryError` if missing, corrupt or foreign.

        ``index`` defaults to the settings it was saved with. Its saved index is used when it was built for
        exactly these rows with these build settings, else rebuilt (logged as a warning with the reason).
        ``load_info`` holds the timings; loads of large galleries are logged at INFO.
        """
        t0 = time.perf_counter()
        path = Path(path)
        emb, owner, meta = read_gallery(path)
        names, thr, dim = meta["names"], meta.get("threshold"), meta.get("dim")
        try:
            spec = saved_spec(meta.get("index"), index, path)
        except GalleryIndexError as e:
            if index is not None:
                raise
            raise GalleryError(f"{path}: corrupt gallery (index settings: {e})") from None
        g = cls(threshold=thr, dim=dim, pipeline=pipeline, index=spec)
        with g._lock:
            s, g._counts = _fresh(names, emb, owner)
            read_s = time.perf_counter() - t0
            view, info = load_saved_index(g._index, path, meta["sha256"], s.embeddings)
            g._state = _freeze(s.all_names, s.people, s.embeddings, s.owner, s.max_rows, s.lookup, view)
            g.load_info = {"rows": len(emb), "read_seconds": round(read_s, 3), **info}
        g.load_info["seconds"] = round(time.perf_counter() - t0, 3)
        if len(emb) >= LOG_LOAD_MIN_ROWS:
            log.info("%s: %d rows loaded in %.1f s (index %s)", path, len(emb), g.load_info["seconds"],
                     g.load_info["index"])
        return g


# ------------------------------------------------------------------------------------------ helpers


def _is_embedding(x: Any) -> bool:
    """Float 1-D/2-D arrays (or lists of floats) are embeddings; anything else is an image."""
    if isinstance(x, np.ndarray):
        return x.ndim in (1, 2) and np.issubdtype(x.dtype, np.floating)
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, (float, np.floating)) for v in x):
        return True
    return False


def _unit_query(x: Any) -> np.ndarray:
    """One query embedding (any shape holding one vector) as a float32 unit vector; GalleryError when it is
    empty, holds NaN or infinity, or has zero length. The per-query form of :func:`_normalise` (a fraction
    of its numpy calls: this runs once per identify)."""
    q = np.asarray(x, np.float32).reshape(-1)
    if q.size == 0:
        raise GalleryError(f"query: expected a vector or N×D array, got shape {np.shape(x)}")
    norm = math.sqrt(float(np.dot(q, q)))
    if not math.isfinite(norm):
        raise GalleryError("query: embedding contains NaN or infinity")
    if norm < 1e-12:
        raise GalleryError("query: zero-length embedding")
    return q / np.float32(norm)


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise GalleryError(f"{what}: expected a vector or N×D array, got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # NaN or infinity anywhere in a row reaches its norm
    if not np.isfinite(norms).all():
        raise GalleryError(f"{what}: embedding contains NaN or infinity")
    if (norms < 1e-12).any():
        raise GalleryError(f"{what}: zero-length embedding")
    return l2_normalize(x)


def _label(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"<{type(image).__name__}>"


def _pipeline_threshold(pipeline: Any) -> float | None:
    if pipeline is None:
        return None
    for attr in ("threshold", "threshold_cosine"):
        value = getattr(pipeline, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


__all__ = ["Gallery", "GalleryError", "IndexSpec", "UNKNOWN"]

"""Search indexes for a :class:`~runtime.gallery.Gallery`: exact search, and HNSW / IVF graphs and cells on faiss.

Kinds (``Gallery(index=...)``):

* ``"exact"`` — every row is scored: faiss's exhaustive scan over the gallery's own rows when faiss is
  installed (no copy of them), else numpy. Needs nothing optional.
* ``"hnsw"`` — a faiss HNSW graph over compressed copies of the rows (``storage`` SQ8 by default: one byte per
  dimension, plus about 8·``m`` bytes of graph links per row). Low latency at any size.
* ``"ivf"`` — faiss inverted lists (k-means cells, :data:`IVF_PROBE_FRACTION` of them visited per query) over
  4-bit PQ codes of the rows scanned with SIMD lookups (``pq4``, default: ``dim/4`` bytes per row plus an
  8-byte id), 8-bit PQ, SQ8 or fp16 codes: the least memory per row.
* ``"auto"`` — exact below :data:`AUTO_ANN_MIN_ROWS` rows (where it is also the faster one), then
  :data:`AUTO_ANN_KIND`; exact when faiss is missing.

Re-ranking: the index proposes ``candidates`` rows (more when a query asks for more); they are re-scored
exactly against the gallery's float32 rows, so every returned similarity is an exact cosine and only which
rows were proposed is approximate. The faiss indexes use L2 on the unit vectors, which ranks exactly as
cosine does.

Ids: the index knows rows by an *id*: the order in which they were added to it. ``ids[id]`` is the row it
stands for in the current gallery, −1 once removed. Enrolment appends ids (incremental ``add``, no
rebuild). Removal marks ids dead (tombstones) that the search skips (faiss ``IDSelectorBitmap`` inside the
graph walk or list scan); the faiss index itself is never changed by a removal, so older snapshots stay
exact. HNSW graphs cannot delete, and faiss 1.15's ``remove_ids`` on fast-scan IVF lists loses rows added
after it, hence tombstones for both. Either kind is rebuilt once :data:`REBUILD_DEAD_FRACTION` of its ids are
dead (the id map costs 4 bytes per id, dead or alive). IVF cells are trained on the rows present at build time; an IVF index is
also rebuilt when the gallery has grown :data:`IVF_REBUILD_GROWTH` times since.

Thread safety: faiss searches may run concurrently (faiss releases the GIL) but never during an ``add``, so a
readers–writer lock guards the faiss index. Each gallery snapshot holds an :class:`IndexView` (the index and
the ids it had when published): a search only returns rows of its own snapshot.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator

import numpy as np

from .optional_imports import importable, require_module

KINDS = ("exact", "hnsw", "ivf", "auto")
#: Codes an index keeps per row; the first is the default. ``pq4``: 4-bit product quantisation scanned with
#: SIMD lookups (faiss fast-scan), ``pq``: 8-bit PQ, ``sq8`` / ``fp16``: one byte / half float per dimension.
STORAGES = {"hnsw": ("sq8", "fp16", "flat"), "ivf": ("pq4", "sq8", "fp16", "pq")}
#: The approximate index ``auto`` uses above :data:`AUTO_ANN_MIN_ROWS` (the one measured best at 10⁵–10⁶ rows).
AUTO_ANN_KIND = "ivf"
#: IVF queries visit this fraction of the cells, and at least IVF_MIN_PROBES, unless ``nprobe`` is set
#: (recall@1 ≥ 0.99 against exact search at 10⁴–10⁶ rows in `benchmarks/run.py gallery`).
IVF_PROBE_FRACTION = 0.14
IVF_MIN_PROBES = 48
#: IVF ``pq4`` codes encode the rows themselves, not their offsets from the cell centre (faiss ``by_residual``):
#: one distance table per query instead of one per visited cell; the cells, hence recall@1, are the same.
IVF_PQ4_BY_RESIDUAL = False
#: k-means iterations for IVF cells (faiss's default is 10; more gives cells that need fewer probes).
IVF_KMEANS_ITERATIONS = 20
#: ``auto`` uses :data:`AUTO_ANN_KIND` from this many rows on: where it is ≥ 10 % faster than exact search (p50,
#: one thread) at this and every larger size measured by `python benchmarks/run.py gallery` (its crossover
#: section) on a 2-core AMD EPYC (Zen 3, AVX2): exact 1.70 ms vs IVF 0.27 ms at 20,000 rows (10,000: 0.35 vs
#: 0.33 ms).
AUTO_ANN_MIN_ROWS = 20_000
#: Fewer rows than this are always searched exactly: quantisers and IVF cells need rows to train on.
MIN_TRAIN_ROWS = 1_000
#: Indexes are rebuilt when this fraction of their ids has been removed.
REBUILD_DEAD_FRACTION = 0.25
#: IVF indexes are rebuilt (cells re-trained) when the gallery has this many times the rows they were built on.
IVF_REBUILD_GROWTH = 4.0
#: Rows sampled to train quantisers and IVF cells.
TRAIN_SAMPLE = 256_000
#: Exact search uses faiss's scan (when installed) from this many rows on; numpy below.
FAISS_EXACT_MIN_ROWS = 2_000
#: Adds of fewer rows run faiss on one thread: OpenMP teams for tiny work wait on each other on a busy CPU
#: (a one-row add took 13 ms with 2 threads against 0.01 ms with 1 on the shared 2-core machine).
PARALLEL_MIN_ROWS = 1_000


class GalleryIndexError(ValueError):
    """An index setting is invalid."""


def require_faiss():
    """The faiss module, or an ImportError naming the ``faiss`` extra."""
    return require_module("faiss", ImportError, "approximate gallery indexes (index='hnsw' / 'ivf') need faiss: "
                                                "pip install 'facekit[faiss]' (or faiss-cpu)")


@dataclass(frozen=True)
class IndexSpec:
    """How a gallery is searched. Build settings decide the saved index; search settings apply per query."""

    kind: str = "auto"
    storage: str | None = None  # codes kept by the index (:data:`STORAGES`; None: the kind's default)
    m: int = 32  # HNSW links per node and layer (2·m on the base layer)
    ef_construction: int = 40  # HNSW build-time search width
    nlist: int | None = None  # IVF cells (None: :func:`default_nlist` of the rows at build time)
    pq_m: int | None = None  # IVF PQ sub-quantisers (None: dim / 2, i.e. 2 dimensions each)
    ef_search: int = 128  # HNSW search width (raised to the candidates asked for)
    nprobe: int | None = None  # IVF cells visited per query (None: IVF_PROBE_FRACTION of them)
    candidates: int = 64  # rows proposed by the index and re-ranked exactly

    BUILD = ("storage", "m", "ef_construction", "nlist", "pq_m")

    @classmethod
    def parse(cls, index: "str | IndexSpec | dict | None") -> "IndexSpec":
        """An ``IndexSpec`` from a kind name, a dict of fields, or an ``IndexSpec``; checked."""
        if index is None:
            spec = cls()
        elif isinstance(index, IndexSpec):
            spec = index
        elif isinstance(index, str):
            spec = cls(kind=index)
        elif isinstance(index, dict):
            names = {f.name for f in fields(cls)}
            unknown = set(index) - names
            if unknown:
                raise GalleryIndexError(f"index: unknown settings {sorted(unknown)}")
            spec = cls(**index)
        else:
            raise GalleryIndexError(f"index must be one of {KINDS} or an IndexSpec, got {type(index).__name__}")
        spec._check()
        ann = AUTO_ANN_KIND if spec.kind == "auto" else spec.kind
        if spec.storage is None and ann in STORAGES:
            spec = replace(spec, storage=STORAGES[ann][0])
        return spec

    def _check(self) -> None:
        if self.kind not in KINDS:
            raise GalleryIndexError(f"index must be one of {', '.join(KINDS)}; got {self.kind!r}")
        allowed = STORAGES.get(AUTO_ANN_KIND if self.kind == "auto" else self.kind)
        if allowed and self.storage is not None and self.storage not in allowed:
            raise GalleryIndexError(f"index storage for {self.kind} must be one of {allowed}; got {self.storage!r}")
        for name in ("m", "ef_construction", "ef_search", "candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GalleryIndexError(f"index {name} must be a positive integer, got {value!r}")
        for name in ("nlist", "pq_m", "nprobe"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GalleryIndexError(f"index {name} must be a positive integer or None, got {value!r}")
        if self.kind in ("hnsw", "ivf"):
            require_faiss()

    def to_dict(self) -> dict:
        return asdict(self)

    def build_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.BUILD}

    def ann_kind(self, rows: int) -> str | None:
        """The approximate index to keep at ``rows`` rows ("hnsw" / "ivf"), or None for exact search."""
        if self.kind == "exact" or rows < MIN_TRAIN_ROWS:
            return None
        if self.kind == "auto":
            return AUTO_ANN_KIND if rows >= AUTO_ANN_MIN_ROWS and importable("faiss") else None
        return self.kind


class RWLock:
    """Many readers or one writer (writers go first once waiting, so adds are not starved)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def reading(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------------------ exact search


def exact_search(embeddings: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows to the unit vector ``q`` as ``(similarities, rows)``, best first."""
    n = len(embeddings)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if n >= FAISS_EXACT_MIN_ROWS and importable("faiss"):
        import faiss

        sims, rows = faiss.knn(q.reshape(1, -1), embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
        ok = rows[0] >= 0
        return sims[0][ok], rows[0][ok]
    all_sims = embeddings @ q
    rows = np.argpartition(-all_sims, k - 1)[:k] if k < n else np.arange(n)
    rows = rows[np.argsort(-all_sims[rows], kind="stable")]
    return all_sims[rows], rows


# ------------------------------------------------------------------------------------------ ANN index


def default_nlist(rows: int) -> int:
    """IVF cells for ``rows`` rows: the power of two nearest √rows / 2 (few large cells suit fast-scan, whose
    cost per visited cell is high), at least 16 and with ≥ 39 training rows per cell."""
    nlist = 2 ** max(4, round(math.log2(math.sqrt(max(rows, 1)) / 2)))
    while nlist > 16 and rows < 39 * nlist:
        nlist //= 2
    return nlist


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP threads for work started by the calling thread (the setting is per thread)."""
    faiss = require_faiss()
    before = faiss.omp_get_max_threads()
    if before == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _factory_string(spec: IndexSpec, kind: str, dim: int, rows: int) -> str:
    if kind == "hnsw":
        return f"HNSW{spec.m}" + {"flat": "", "sq8": "_SQ8", "fp16": "_SQfp16"}[spec.storage]
    nlist = spec.nlist or default_nlist(rows)
    pq_m = spec.pq_m or max(1, dim // 2)
    if spec.storage in ("pq", "pq4") and dim % pq_m:
        raise GalleryIndexError(f"index pq_m={pq_m} must divide the embedding size {dim}")
    return f"IVF{nlist}," + {"sq8": "SQ8", "fp16": "SQfp16", "pq": f"PQ{pq_m}", "pq4": f"PQ{pq_m}x4fs"}[spec.storage]


class AnnIndex:
    """A faiss index over the gallery's rows, with the id → row map (see the module docstring).

    Writer-side methods (``add``, ``remove``) are called under the gallery's lock; searches go through
    :class:`IndexView`.
    """

    def __init__(self, spec: IndexSpec, kind: str, index: Any, ids: np.ndarray, built_rows: int):
        self.spec = spec
        self.kind = kind
        self.index = index
        self.lock = RWLock()
        self._ids = ids  # buffer with spare capacity; the first ``n_ids`` entries are in use
        self.n_ids = len(ids)
        self.dead = int(np.count_nonzero(ids < 0))
        self.built_rows = int(built_rows)

    # --------------------------------------------------------------------------- building and changes

    @classmethod
    def build(cls, spec: IndexSpec, kind: str, embeddings: np.ndarray, seed: int = 0) -> "AnnIndex":
        """A new index over all ``embeddings`` (rows 0..n−1 get ids 0..n−1)."""
        faiss = require_faiss()
        n, dim = embeddings.shape
        index = faiss.index_factory(dim, _factory_string(spec, kind, dim, n), faiss.METRIC_L2)  # already downcast
        if kind == "hnsw":
            index.hnsw.efConstruction = spec.ef_construction
        else:
            index.cp.niter = IVF_KMEANS_ITERATIONS
            if spec.storage == "pq4":
                index.by_residual = IVF_PQ4_BY_RESIDUAL
        if not index.is_trained:
            sample = embeddings
            if n > TRAIN_SAMPLE:
                pick = np.sort(np.random.default_rng(seed).choice(n, TRAIN_SAMPLE, replace=False))
                sample = embeddings[pick]
            with _faiss_threads(1):  # thousands of tiny parallel regions: one thread is faster on a busy CPU
                index.train(np.ascontiguousarray(sample, np.float32))
        ann = cls(spec, kind, index, np.arange(n, dtype=np.int32), n)
        ann._faiss_add(np.ascontiguousarray(embeddings, np.float32), np.arange(n))
        return ann

    def _faiss_add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        few = len(vectors) < PARALLEL_MIN_ROWS
        with self.lock.writing(), (_faiss_threads(1) if few else nullcontext()):
            if self.kind == "ivf":
                self.index.add_with_ids(vectors, ids.astype(np.int64))
            else:
                self.index.add(vectors)  # HNSW ids are the insertion order

    def add(self, vectors: np.ndarray, first_row: int) -> None:
        """Index new gallery rows ``first_row, first_row+1, …`` (incremental)."""
        k = len(vectors)
        if self.n_ids + k > len(self._ids):  # grow the id map; published views keep their own prefix
            grown = np.empty(max(1024, 2 * (self.n_ids + k)), np.int32)
            grown[:self.n_ids] = self._ids[:self.n_ids]
            self._ids = grown
        new_ids = np.arange(self.n_ids, self.n_ids + k)
        self._faiss_add(np.ascontiguousarray(vectors, np.float32), new_ids)
        self._ids[self.n_ids:self.n_ids + k] = np.arange(first_row, first_row + k, dtype=np.int32)
        self.n_ids += k

    def remove(self, keep: np.ndarray) -> None:
        """The gallery kept rows where ``keep`` is True (and renumbered them in order): follow it."""
        ids = self._ids[:self.n_ids]
        new_row = np.full(len(keep) + 1, -1, np.int32)  # index −1 (dead ids) stays −1
        new_row[:-1][keep] = np.arange(int(np.count_nonzero(keep)), dtype=np.int32)
        mapped = new_row[ids]
        dropped = np.count_nonzero((ids >= 0) & (mapped < 0))
        fresh = np.empty(len(self._ids), np.int32)  # a new array: published views keep the old map
        fresh[:self.n_ids] = mapped
        self._ids = fresh
        self.dead += int(dropped)

    def stale(self, rows: int) -> bool:
        """True when the index should be rebuilt for a gallery of ``rows`` rows."""
        if self.dead > REBUILD_DEAD_FRACTION * max(self.n_ids, 1):
            return True
        return self.kind == "ivf" and rows > IVF_REBUILD_GROWTH * self.built_rows

    def view(self) -> "IndexView":
        ids = self._ids[:self.n_ids].view()
        ids.setflags(write=False)
        return IndexView(self, ids, self.dead, self.spec)



class IndexKeeper:
    """The writer side of a gallery's index: the spec, and the index that the current size needs (or None).

    Called under the gallery's lock; returns the :class:`IndexView` to publish with each new snapshot.
    """

    def __init__(self, spec: IndexSpec):
        self.spec = spec
        self.ann: AnnIndex | None = None

    def update(self, emb: np.ndarray, added_from: int | None = None,
               keep: np.ndarray | None = None) -> "IndexView | None":
        """Follow the gallery to its new rows ``emb``: rows appended from ``added_from`` on, or the rows ``keep``
        of the previous rows kept. Builds, updates, rebuilds or drops the index as the spec and size need."""
        kind = self.spec.ann_kind(len(emb))
        ann = self.ann
        try:
            if kind is None:
                self.ann = None
            elif ann is None or ann.kind != kind:
                self.ann = AnnIndex.build(self.spec, kind, emb)
            else:
                if keep is not None:
                    ann.remove(keep)
                elif added_from is not None and added_from < len(emb):
                    ann.add(emb[added_from:], added_from)
                if ann.stale(len(emb)):
                    self.ann = AnnIndex.build(self.spec, kind, emb)
        except BaseException:
            self.ann = None  # an index in an unknown state is dropped; the next change rebuilds it
            raise
        return self.view()

    def respec(self, spec: IndexSpec, emb: np.ndarray) -> "IndexView | None":
        """Switch to ``spec``; the built index stays when only search settings changed."""
        ann = self.ann
        self.spec = spec
        if ann is not None and ann.kind == spec.ann_kind(len(emb)) and ann.spec.build_settings() == spec.build_settings():
            ann.spec = spec
            return ann.view()
        self.ann = None
        return self.update(emb)

    def view(self) -> "IndexView | None":
        return None if self.ann is None else self.ann.view()


@dataclass(frozen=True)
class IndexView:
    """The index as one gallery snapshot sees it: the ids it had (later ids are not this snapshot's rows)."""

    ann: AnnIndex
    ids: np.ndarray
    dead: int
    spec: IndexSpec
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # search parameters per k

    def _params(self, k: int):
        """faiss search parameters for ``k`` results, built once per view. They are stored together with the
        bitmap and selector they point to (faiss does not own them), and concurrent first calls all use the
        one stored first, so no thread searches with parameters whose bitmap was freed."""
        entry = self._cache.get(k)
        if entry is None:
            entry = self._cache.setdefault(k, self._new_params(k))
        return entry[0]

    def _new_params(self, k: int) -> tuple[Any, list]:
        faiss = require_faiss()
        spec = self.spec
        keep: list = []
        if self.ann.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(spec.ef_search, k)
        else:
            params = faiss.SearchParametersIVF()
            nlist = self.ann.index.nlist
            params.nprobe = min(nlist, spec.nprobe or max(IVF_MIN_PROBES, math.ceil(IVF_PROBE_FRACTION * nlist)))
        if self.dead:  # skip tombstones inside the search
            bitmap = np.packbits(self.ids >= 0, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            params.sel = selector
            keep += [bitmap, selector]
        return params, keep

    def search(self, embeddings: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``max(k, candidates)`` rows proposed by the index, re-ranked exactly: ``(similarities, rows)``."""
        want = max(k, self.spec.candidates)
        params = self._params(want)
        lock = self.ann.lock
        lock.acquire_read()  # a plain call: context managers cost more than the rest of a query's Python
        try:
            if require_faiss().omp_get_max_threads() == 1:
                _, labels = self.ann.index.search(q.reshape(1, -1), want, params=params)
            else:
                with _faiss_threads(1):  # nothing to share among threads in one query
                    _, labels = self.ann.index.search(q.reshape(1, -1), want, params=params)
        finally:
            lock.release_read()
        labels = labels[0]
        rows = self.ids[labels[(labels >= 0) & (labels < len(self.ids))]]
        rows = rows[rows >= 0].astype(np.int64)
        sims = embeddings[rows] @ q
        order = np.argsort(-sims, kind="stable")[:k]
        return sims[order], rows[order]


__all__ = ["AUTO_ANN_MIN_ROWS", "AnnIndex", "GalleryIndexError", "IndexKeeper", "IndexSpec", "IndexView", "KINDS",
           "exact_search", "require_faiss"]

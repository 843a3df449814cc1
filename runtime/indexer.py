"""Index a folder of people into a gallery, resumably (``python -m runtime index``).

Input: a folder-per-person tree (``ROOT/<name>/<image>``) or a list file of ``<path> <name>`` lines, paths
relative to ``ROOT``. The images are put in one fixed order (by name, then path) and cut into shards of
``shard_size`` images. Each shard's subject faces (:meth:`FacePipeline.find_subject`'s rule, embedded with
:meth:`FacePipeline.embed_many`) are written atomically to ``<work>/shard-NNNNNN.npz`` with one record per
image. A shard on disk is done: a killed run, started again, computes only the missing shards. The gallery
(people sorted by name, each one's embeddings in path order) and the manifest (one JSON line per image:
faces found, the chosen face, or why the image failed) are assembled from the shards, so they are the same
whether the shards came from one run or several, from one process, a process pool, or a Ray cluster.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .field_options import option
from .files import (atomic_write, atomic_write_bytes, existing_folder, pid_temp_prefix, remove_stale_temporaries,
                    sha256_file)
from .gallery import Gallery
from .photo_lists import PhotoListError, photos_in_tree, read_photo_list
from .pipeline import DEFAULT_ALIGNER, DEFAULT_RECOGNIZER, FacePipeline
from .progress import progress_bar

SHARD_FORMAT = "facekit-index-shard"
PLAN_FILE = "plan.json"
DEFAULT_SHARD_SIZE = 128

#: ``compute(plan, shard indices)`` yields ``(shard index, shard file bytes)`` in any order.
Compute = Callable[["IndexPlan", Sequence[int]], Iterable[tuple[int, bytes]]]


class IndexingError(ValueError):
    """Unusable indexer input or work folder (one line, naming the file and the reason)."""


@dataclass(frozen=True)
class Entry:
    """One image to index: its ``path`` relative to the root ('/'-separated) and the person's ``name``."""

    path: str
    name: str


@dataclass(frozen=True)
class IndexJob:
    """How a shard is computed; picklable (it travels to worker processes and Ray actors). ``pipeline``:
    :class:`FacePipeline` keyword arguments; ``min_face``/``dominance``/``retry_threshold``: the subject
    rule's options; ``batch_size``/``threads``: :meth:`FacePipeline.embed_many`'s."""

    root: str
    pipeline: dict = field(default_factory=dict)
    min_face: float = option(0.0, "ignore faces whose shorter box side is below PX")
    dominance: float = option(0.0, "refuse photos whose runner-up face scores at least best/DOMINANCE", why="never")
    retry_threshold: float | None = option(None, "detector threshold of one retry when no face is found",
                                           type=float, shown="no retry")
    batch_size: int = option(32, "faces per recognizer call")
    threads: int | None = option(None, "decode/detect threads per process", type=int,
                                 shown="the usable cores in one process, none besides the main one with --processes")

    def make_pipeline(self, **model_options: Any) -> FacePipeline:
        """The job's pipeline; ``model_options`` (e.g. ``threads=1``) override the job's."""
        kwargs = dict(self.pipeline)
        kwargs["model_options"] = {**kwargs.get("model_options", {}), **model_options}
        return FacePipeline(**kwargs)

    def identity(self) -> dict[str, Any]:
        """What decides the results (not the speed): the models, by content, and the subject rule."""
        keep = ("landmarks", "backend", "score_threshold", "flip_test")
        out = {k: self.pipeline[k] for k in keep if self.pipeline.get(k) is not None}
        models = {"recognizer": DEFAULT_RECOGNIZER, "detector": None,
                  "aligner": DEFAULT_ALIGNER if self.pipeline.get("landmarks") == "aligner" else None}
        for role, default in models.items():
            path = self.pipeline.get(role) or default
            if path is not None:
                out[role] = sha256_file(path) if Path(path).is_file() else str(path)
        return {**out, "min_face": self.min_face, "dominance": self.dominance,
                "retry_threshold": self.retry_threshold}


@dataclass
class IndexPlan:
    """The entries in their fixed order, cut into shards; ``plan_id`` names the plan and its results."""

    entries: list[Entry]
    job: IndexJob
    shard_size: int = DEFAULT_SHARD_SIZE
    plan_id: str = ""

    def __post_init__(self):
        if self.shard_size < 1:
            raise IndexingError(f"--shard-size must be at least 1, got {self.shard_size}")
        self.entries = sorted(self.entries, key=lambda e: (e.name, e.path))
        if not self.plan_id:
            h = hashlib.sha256(json.dumps({"job": self.job.identity(), "shard_size": self.shard_size},
                                          sort_keys=True).encode())
            for e in self.entries:
                h.update(f"{e.path}\0{e.name}\n".encode())
            self.plan_id = h.hexdigest()[:20]

    @property
    def shards(self) -> int:
        return -(-len(self.entries) // self.shard_size)

    def shard(self, k: int) -> list[Entry]:
        return self.entries[k * self.shard_size:(k + 1) * self.shard_size]


# ------------------------------------------------------------------------------------------ inputs


def entries_from_tree(root: str | os.PathLike) -> list[Entry]:
    """One entry per image of each person folder ``root/<name>/…`` (:func:`runtime.photo_lists.photos_in_tree`;
    images directly in ``root`` belong to nobody and are not indexed)."""
    root = existing_folder(root, IndexingError)
    entries = [Entry(p.path, p.name) for p in photos_in_tree(root) if p.name is not None]
    if not entries:
        raise IndexingError(f"{root}: no person folders with images; for a flat folder pass --list FILE "
                            "(lines '<file> <name>')")
    return entries


def entries_from_list(list_file: str | os.PathLike) -> list[Entry]:
    """Entries from lines ``<path> <name>`` (:func:`runtime.photo_lists.read_photo_list`; one path under two
    names is refused)."""
    try:
        photos, conflicts = read_photo_list(list_file, require_names=True)
    except PhotoListError as e:
        raise IndexingError(str(e)) from None
    if conflicts:
        c = conflicts[0]
        raise IndexingError(f"{list_file}:{c.line}: {c.path!r} is listed as {c.names[0]!r} and as {c.names[1]!r}")
    if not photos:
        raise IndexingError(f"{list_file}: no entries")
    return [Entry(p.path, p.name) for p in photos]


# ------------------------------------------------------------------------------------------ shards


def compute_shard(pipeline: FacePipeline, job: IndexJob, plan_id: str, k: int, entries: Sequence[Entry]) -> bytes:
    """The shard file (bytes) of ``entries``: one record per image and the chosen faces' embeddings."""
    root = Path(job.root)
    results = pipeline.embed_many([str(root / e.path) for e in entries], subject=True, min_face=job.min_face,
                                  dominance=job.dominance, retry_threshold=job.retry_threshold,
                                  batch_size=job.batch_size, workers=job.threads)
    records, rows = [], []
    for e, r in zip(entries, results):
        rec: dict[str, Any] = {"file": e.path, "name": e.name, "faces": len(r.faces)}
        if r.error is not None:
            rec.update(status="error", reason=r.error)
        elif r.face is None:
            rec.update(status="skipped", reason=r.reason)
        else:
            rec.update(status="ok", face={"box": [round(float(v), 1) for v in r.face.box],
                                          "score": round(r.face.score, 4)})
            rows.append(r.face.embedding)
        records.append(rec)
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    meta = {"format": SHARD_FORMAT, "plan": plan_id, "shard": k, "records": records}
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8))
    return buf.getvalue()


def read_shard(path: Path, plan: IndexPlan, k: int) -> tuple[list[dict], np.ndarray]:
    """Records and embeddings of shard ``k``; :class:`IndexingError` when it is not that shard of ``plan``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            emb = z["embeddings"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is "not done"
        raise IndexingError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    records = meta.get("records") if isinstance(meta, dict) else None
    expected = [e.path for e in plan.shard(k)]
    if (meta.get("format") != SHARD_FORMAT or meta.get("plan") != plan.plan_id or meta.get("shard") != k
            or not isinstance(records, list) or [r.get("file") for r in records] != expected
            or sum(r.get("status") == "ok" for r in records) != len(emb)):
        raise IndexingError(f"{path}: not shard {k} of this plan")
    return records, emb


def shard_path(work: Path, k: int) -> Path:
    return work / f"shard-{k:06d}.npz"


def in_process(plan: IndexPlan, todo: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    """Compute the shards here, with one pipeline (:data:`Compute`)."""
    if not todo:
        return
    pipeline = plan.job.make_pipeline()
    for k in todo:
        yield k, compute_shard(pipeline, plan.job, plan.plan_id, k, plan.shard(k))


_WORKER: dict[str, Any] = {}


def _init_worker(job: IndexJob, model_threads: int) -> None:
    _WORKER["pipeline"] = job.make_pipeline(threads=model_threads)


def _worker_shard(job: IndexJob, plan_id: str, k: int, entries: list[Entry]) -> tuple[int, bytes]:
    return k, compute_shard(_WORKER["pipeline"], job, plan_id, k, entries)


def in_processes(processes: int, model_threads: int = 1) -> Compute:
    """A :data:`Compute` running the shards in ``processes`` spawned processes, each with its own pipeline
    whose models use ``model_threads`` threads (and no decode threads unless the job sets ``threads``); at
    most two shards per process are queued."""
    if processes < 1:
        raise IndexingError(f"--processes must be at least 1, got {processes}")

    def compute(plan: IndexPlan, todo: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        if not todo:
            return
        job = plan.job if plan.job.threads is not None else dataclasses.replace(plan.job, threads=0)
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(job, model_threads))
        queue, running = iter(todo), set()
        try:
            while True:
                for k in queue:
                    running.add(pool.submit(_worker_shard, job, plan.plan_id, k, plan.shard(k)))
                    if len(running) >= 2 * processes:
                        break
                if not running:
                    return
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return compute


# -------------------------------------------------------------------------------------------- runs


@dataclass
class IndexSummary:
    """What a run produced: counts, failure reasons, and the files written."""

    images: int
    people: int
    enrolled_images: int
    enrolled_people: int
    computed_shards: int
    reused_shards: int
    failures: dict[str, int]
    gallery: str
    manifest: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Hold ``work``'s lock file: one indexer per work folder at a time."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexingError(f"{work}: another indexer is using this work folder") from None
        yield


def _check_plan(work: Path, plan: IndexPlan, restart: bool) -> None:
    """Start ``work`` for ``plan``, or check that it already belongs to ``plan``."""
    path = work / PLAN_FILE
    if restart:
        for old in work.glob("shard-*.npz"):
            old.unlink()
        path.unlink(missing_ok=True)
    if path.is_file():
        try:
            have = json.loads(path.read_text()).get("plan")
        except (OSError, ValueError, AttributeError):
            have = None
        if have != plan.plan_id:
            raise IndexingError(f"{work}: holds the work of a different index run (other images, models or "
                                "options); pass --restart to discard it, or --work DIR")
        return
    info = {"plan": plan.plan_id, "root": plan.job.root, "images": len(plan.entries), "shards": plan.shards,
            "shard_size": plan.shard_size, "identity": plan.job.identity()}
    atomic_write_bytes(path, json.dumps(info, indent=1).encode())


def _done_shards(work: Path, plan: IndexPlan, log: Callable[[str], None]) -> set[int]:
    """Shards already on disk and valid; leftovers of killed writers and invalid shards are removed."""
    for target in {t.name[1:].split(".npz.")[0] for t in work.glob(".shard-*.npz.*.tmp")}:
        remove_stale_temporaries(work / f"{target}.npz")
    done = set()
    for k in range(plan.shards):
        path = shard_path(work, k)
        if path.is_file():
            try:
                read_shard(path, plan, k)
                done.add(k)
            except IndexingError as e:
                log(f"recomputing: {e}")
                path.unlink()
    return done


def run_index(plan: IndexPlan, out: str | os.PathLike, *, manifest: str | os.PathLike | None = None,
              work: str | os.PathLike | None = None, compute: Compute = in_process, restart: bool = False,
              keep_parts: bool = False, progress: bool | None = None,
              log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> IndexSummary:
    """Compute the missing shards of ``plan`` with ``compute``, then write the gallery ``out`` and the
    manifest (default ``<out stem>.manifest.jsonl``); ``work`` (default ``<out>.parts``) holds the shards
    and is removed at the end unless ``keep_parts``."""
    out = Path(out)
    manifest = Path(manifest) if manifest else out.with_name(out.stem + ".manifest.jsonl")
    work = Path(work) if work else out.with_name(out.name + ".parts")
    with _locked(work):
        _check_plan(work, plan, restart)
        done = _done_shards(work, plan, log)
        todo = [k for k in range(plan.shards) if k not in done]
        done_images = sum(len(plan.shard(k)) for k in done)
        with progress_bar(len(plan.entries), desc="index", initial=done_images, enabled=progress) as bar:
            for k, data in compute(plan, todo):
                path = shard_path(work, k)
                atomic_write(path, lambda f: f.write(data), tmp_prefix=pid_temp_prefix(path))
                bar.update(len(plan.shard(k)))
        summary = _assemble(plan, work, out, manifest)
        summary.computed_shards, summary.reused_shards = len(todo), len(done)
    if not keep_parts:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _assemble(plan: IndexPlan, work: Path, out: Path, manifest: Path) -> IndexSummary:
    """The gallery and the manifest from every shard of ``plan``, in the plan's order."""
    gallery, lines, failures = Gallery(), [], Counter()
    name, rows, enrolled = None, [], 0

    def flush() -> None:
        if rows:
            gallery.enroll(name, np.concatenate(rows))

    for k in range(plan.shards):
        records, emb = read_shard(shard_path(work, k), plan, k)
        row = 0
        for rec in records:
            if rec["name"] != name:
                flush()
                name, rows = rec["name"], []
            if rec["status"] == "ok":
                rows.append(emb[row:row + 1])
                row += 1
                enrolled += 1
            else:
                failures[rec["reason"]] += 1
            lines.append(json.dumps(rec, ensure_ascii=False))
    flush()
    gallery.save(out)
    text = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write(manifest, lambda f: f.write(text), tmp_prefix=pid_temp_prefix(manifest))
    remove_stale_temporaries(manifest)
    return IndexSummary(len(plan.entries), len({e.name for e in plan.entries}), enrolled, len(gallery), 0, 0,
                        dict(failures.most_common()), str(out), str(manifest))


__all__ = ["Entry", "IndexJob", "IndexPlan", "IndexSummary", "IndexingError", "compute_shard", "entries_from_list",
           "entries_from_tree", "in_process", "in_processes", "read_shard", "run_index"]

"""The server's galleries: one ``<name>.npz`` per gallery in one folder, locked for the server's life.

Durability: a change (enrol, replace, remove) is applied, then the whole gallery is saved with
:meth:`runtime.gallery.Gallery.save` (temporary file, fsync, atomic rename, fsync of the folder) before the
call returns, so a request is acknowledged only once its change is on disk; a server killed at any moment
leaves each gallery file as of its last acknowledged change (or the one being saved). If the save fails,
the in-memory gallery is reloaded from its file, so memory never runs ahead of the disk for long.

Concurrency: writers of one gallery are serialised by a lock; readers (``identify``, listing) take no
lock: :class:`~runtime.gallery.Gallery` answers from immutable snapshots. Replacing a person is a
removal and an enrolment, so a reader in that instant may miss them.

Exclusivity: :class:`FolderLock` holds ``fcntl.flock`` on ``<folder>/.facekit-serve.lock`` while the server
runs; a second server on the same folder is refused at start instead of overwriting the first one's saves.
The kernel drops the lock when its process dies, SIGKILL included.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..files import remove_stale_temporaries
from ..gallery import Gallery, GalleryError
from .config import ServeError
from .errors import ApiError

log = logging.getLogger("facekit.serve")

LOCK_NAME = ".facekit-serve.lock"
GALLERY_SUFFIX = ".npz"
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_PERSON_NAME = 128


def check_gallery_name(name: str) -> str:
    """``name`` if it is a valid gallery name (letters, digits, ``_``, ``-``; 1–64, starting with a letter or
    digit: it becomes a file name), else a 400 :class:`ApiError`."""
    if not GALLERY_NAME.fullmatch(name or ""):
        raise ApiError(400, f"invalid gallery name {name[:80]!r}: use 1-64 letters, digits, '_' or '-', "
                            "starting with a letter or digit", "invalid_name")
    return name


def check_person_name(name: str) -> str:
    """``name`` if it is a valid person name (1–128 characters, no control characters, no ``/`` or ``\\``,
    no leading or trailing space, not ``.`` or ``..``), else a 400 :class:`ApiError`."""
    problem = None
    if not name or len(name) > MAX_PERSON_NAME:
        problem = f"must have 1-{MAX_PERSON_NAME} characters"
    elif name != name.strip():
        problem = "must not start or end with white space"
    elif name in (".", "..") or "/" in name or "\\" in name:
        problem = "must not be '.' or '..' or contain '/' or '\\'"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        problem = "must not contain control or unassigned characters"
    if problem:
        raise ApiError(400, f"invalid person name {name[:80]!r}: {problem}", "invalid_name")
    return name


class FolderLock:
    """An exclusive ``flock`` on ``folder/.facekit-serve.lock`` (holding this process's pid) until
    :meth:`release`; the folder is created if absent. :class:`ServeError` when another process holds the
    lock or the folder is unusable."""

    def __init__(self, folder: str | os.PathLike):
        import fcntl

        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServeError(f"--galleries {folder}: cannot create the folder ({e.strerror or e})") from None
        if not os.access(self.folder, os.R_OK | os.W_OK | os.X_OK):
            raise ServeError(f"--galleries {folder}: the folder must be readable and writable")
        self.path = self.folder / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise ServeError(f"{folder}: galleries folder is in use by another facekit server (pid {holder}, "
                             f"lock {self.path}); stop it or use another --galleries folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        import fcntl

        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class GalleryStore:
    """The galleries of the folder that ``lock`` holds (see the module docstring). ``pipeline`` supplies the
    threshold of galleries that have none; ``on_change(name, gallery)`` is called after every durable change."""

    def __init__(self, lock: FolderLock, pipeline: Any = None,
                 on_change: Callable[[str, Gallery], None] | None = None):
        self.folder = lock.folder
        self.lock = lock
        self.pipeline = pipeline
        self._on_change = on_change or (lambda name, g: None)
        self._galleries: dict[str, Gallery] = {}
        self._broken: dict[str, str] = {}
        self._writers: dict[str, threading.Lock] = {}
        self._writers_guard = threading.Lock()
        self._load_all()

    def _load_all(self) -> None:
        for path in sorted(self.folder.glob(f"*{GALLERY_SUFFIX}")):
            name = path.name[: -len(GALLERY_SUFFIX)]
            if not GALLERY_NAME.fullmatch(name):
                log.warning("ignoring %s: not a valid gallery name", path)
                continue
            remove_stale_temporaries(path)  # left by a server killed while saving
            try:
                self._galleries[name] = Gallery.load(path, pipeline=self.pipeline)
                self._on_change(name, self._galleries[name])
            except GalleryError as e:
                self._broken[name] = str(e)
                log.error("gallery %s is unreadable and will not be served or written: %s", name, e)

    # ------------------------------------------------------------------------------------ reading

    @property
    def names(self) -> list[str]:
        return sorted(self._galleries)

    @property
    def broken(self) -> dict[str, str]:
        """Galleries whose file could not be read: name → reason (they are neither served nor written)."""
        return dict(self._broken)

    def path(self, name: str) -> Path:
        return self.folder / f"{check_gallery_name(name)}{GALLERY_SUFFIX}"

    def get(self, name: str) -> Gallery:
        """The gallery ``name``; 404 when there is none, 500 when its file is unreadable."""
        check_gallery_name(name)
        self._refuse_broken(name)
        g = self._galleries.get(name)
        if g is None:
            raise ApiError(404, f"gallery {name!r} not found", "gallery_not_found")
        return g

    def threshold(self, g: Gallery) -> float | None:
        """The cosine threshold ``g`` identifies with: its own, else the pipeline's."""
        return g.threshold if g.threshold is not None else getattr(self.pipeline, "threshold", None)

    def _refuse_broken(self, name: str) -> None:
        if name in self._broken:
            raise ApiError(500, f"gallery {name!r} is unreadable ({self._broken[name]}); it is not served "
                                "or overwritten until repaired and the server restarted", "gallery_unreadable")

    # ------------------------------------------------------------------------------------ writing

    def _writer(self, name: str) -> threading.Lock:
        with self._writers_guard:
            return self._writers.setdefault(name, threading.Lock())

    def enroll(self, name: str, person: str, vectors: np.ndarray, replace: bool = False) -> dict[str, Any]:
        """Add ``vectors`` (N×D) to ``person`` (``replace``: instead of their old ones) in gallery ``name``
        (created if absent) and save it; returns what the answer reports."""
        check_gallery_name(name)
        check_person_name(person)
        with self._writer(name):
            self._refuse_broken(name)
            g = self._galleries.get(name)
            created = g is None
            if created:
                g = Gallery(pipeline=self.pipeline)
            if g.dim is not None and vectors.shape[1] != g.dim:
                raise ApiError(409, f"gallery {name!r} holds {g.dim}-d embeddings, this server's recognizer "
                                    f"makes {vectors.shape[1]}-d ones", "dimension_mismatch")
            replaced = replace and person in g
            try:
                if replaced:
                    g.remove(person)
                added = g.enroll(person, vectors)
                g.save(self.path(name))
            except BaseException:
                if not created:
                    self._reload(name)
                raise
            if created:
                self._galleries[name] = g  # visible only once it is on disk
            self._on_change(name, g)
            return {"gallery": name, "name": person, "added": int(added), "replaced": bool(replaced),
                    "embeddings": int(len(g.embeddings(person))), "people": len(g)}

    def remove(self, name: str, person: str) -> dict[str, Any]:
        """Forget ``person`` in gallery ``name`` and save it; 404 when they are not enrolled."""
        check_person_name(person)
        with self._writer(name):
            g = self.get(name)
            if person not in g:
                raise ApiError(404, f"{person!r} is not enrolled in gallery {name!r}", "person_not_found")
            try:
                removed = g.remove(person)
                g.save(self.path(name))
            except BaseException:
                self._reload(name)
                raise
            self._on_change(name, g)
            return {"gallery": name, "name": person, "removed": int(removed), "people": len(g)}

    def _reload(self, name: str) -> None:
        """After a failed change: the gallery as its file has it (unreadable → no longer served)."""
        try:
            self._galleries[name] = Gallery.load(self.path(name), pipeline=self.pipeline)
        except GalleryError as e:
            self._galleries.pop(name, None)
            self._broken[name] = str(e)
            log.error("gallery %s could not be reloaded after a failed change: %s", name, e)

"""File helpers, defined once: existence checks, atomic writes, cleanup after killed writers, file hashing
and facekit's cache folder.

Atomic writes: temp file in the same folder, flush, fsync, ``os.replace``, fsync the folder. A reader sees
either the previous complete file or the new complete file, never a partial one, even when the writer is
killed. Used by the gallery, the CLI, checkpoints, ONNX export, ``make_aligned.py`` and the benchmarks.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def existing_file(path: str | os.PathLike, error: Callable[[str], Exception] = FileNotFoundError,
                  what: str = "file") -> Path:
    """``path`` as a :class:`Path` when it is a file, else raise ``error("<path>: <what> not found")``."""
    return _checked(path, Path.is_file, error, f"{what} not found")


def existing_folder(path: str | os.PathLike, error: Callable[[str], Exception] = FileNotFoundError,
                    what: str = "a folder") -> Path:
    """``path`` as a :class:`Path` when it is a folder, else raise ``error("<path>: not <what>")``."""
    return _checked(path, Path.is_dir, error, f"not {what}")


def _checked(path: str | os.PathLike, test: Callable[[Path], bool], error: Callable[[str], Exception],
             problem: str) -> Path:
    path = Path(path)
    if not test(path):
        raise error(f"{path}: {problem}")
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], tmp_prefix: str | None = None,
                 make_parents: bool = True) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, then atomically put it in place; returns ``path``.

    ``tmp_prefix`` names the temp file (default ``.<name>.``) so callers can find leftovers of killed writers.
    ``make_parents=False`` raises ``FileNotFoundError`` when the folder does not exist.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return path


def temp_beside(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new empty temp file in ``path``'s folder, for work that is checked before :func:`publish` puts it
    in place (the caller deletes it if it is never published)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    return Path(name)


def publish(candidate: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Atomically put the finished file ``candidate`` (in the same folder) at ``path``, durably."""
    path = Path(path)
    os.replace(candidate, path)
    fsync_dir(path.parent if str(path.parent) else Path("."))
    return path


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder below ``folder`` (and ``folder`` itself) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot, and the paths are then untouched."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def publish_folder(candidate: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Durably put the finished folder ``candidate`` (in the same parent) at ``path``, replacing what is there.

    Where the system swaps paths in one step (:func:`exchange_paths`), ``path`` is at every moment either the
    previous folder or the complete new one, even if the process is killed; elsewhere there is a moment
    between two renames when ``path`` is absent, and the previous folder is put back if the second fails.
    """
    candidate, path = Path(candidate), Path(path)
    fsync_tree(candidate)
    parent = path.parent if str(path.parent) else Path(".")
    if not path.exists():
        os.replace(candidate, path)
    elif exchange_paths(candidate, path):
        shutil.rmtree(candidate, ignore_errors=True)
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(candidate, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, make_parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data), make_parents=make_parents)


def pid_temp_prefix(path: str | os.PathLike) -> str:
    """A temp-file prefix for :func:`atomic_write` naming this process (``.<name>.<pid>.``), so that
    :func:`remove_stale_temporaries` can tell a killed writer's leftovers from a live writer's file."""
    return f".{Path(path).name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files and folders of ``path`` (named by :func:`pid_temp_prefix`) whose writer process
    no longer exists; returns what was deleted."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """facekit's cache folder (aligned crops, compiled models): ``$FACEKIT_CACHE``, else ``~/.cache/facekit``."""
    return Path(os.environ.get("FACEKIT_CACHE") or Path.home() / ".cache" / "facekit")

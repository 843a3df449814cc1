"""Which photos, of whom: image files in a folder, a folder-per-person tree, or a ``<file> <name>`` list.

One definition of the image extensions and of both input layouts, for every tool that takes a collection of
labelled photos (``python -m runtime index``, ``train/make_aligned.py``, the CLI's ``matrix``).
Paths are relative to the collection's root, ``/``-separated; a photo without a person has ``name`` None.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .files import existing_folder

#: The image files facekit reads from folders (by extension, case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledPhoto:
    """A photo's ``path`` below the collection's root ('/'-separated) and its person's ``name`` (or None)."""

    path: str
    name: str | None


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS`."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def iter_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    folder = existing_folder(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)), key=lambda p: p.name)


def photos_in_tree(root: str | os.PathLike) -> list[LabelledPhoto]:
    """Every image below ``root`` in path order: ``root/<name>/…/<photo>`` belongs to ``name``; photos
    directly in ``root`` to nobody. Hidden folders are skipped."""
    root = existing_folder(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for file in sorted(f for f in filenames if is_image_file(f)):
            rel = (Path(dirpath) / file).relative_to(root).as_posix()
            out.append(LabelledPhoto(rel, rel.split("/")[0] if "/" in rel else None))
    return out


class PhotoListError(ValueError):
    """A photo list cannot be read, or a line of it is not ``<file> [<name>]``."""


@dataclass(frozen=True)
class Conflict:
    """A file a photo list names under several ``names``; ``line`` is where the second name appears."""

    path: str
    names: tuple[str | None, ...]
    line: int


def read_photo_list(list_file: str | os.PathLike, require_names: bool = False
                    ) -> tuple[list[LabelledPhoto], list[Conflict]]:
    """The photos of a list of ``<file> [<name>]`` lines (blank and ``#`` lines skipped; an exactly repeated
    line counts once), in first-seen order, and the files listed under more than one name, which are left
    out of the photos. Absolute paths, paths through ``..`` and (with ``require_names``) lines without a
    name are refused with :class:`PhotoListError` naming the line."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PhotoListError(f"{list_file}: cannot read the list ({getattr(e, 'strerror', None) or e})") from None
    names: dict[str, list[str | None]] = {}
    conflict_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 1)
        if require_names and len(parts) != 2:
            raise PhotoListError(f"{list_file}:{number}: expected '<file> <name>', got {line.strip()!r}")
        path = parts[0].replace("\\", "/")
        if path.startswith("/") or ".." in path.split("/"):
            raise PhotoListError(f"{list_file}:{number}: {path!r} must be a path below the image folder")
        name = parts[1].strip() if len(parts) > 1 else None
        if name not in names.setdefault(path, []):
            names[path].append(name)
            if len(names[path]) == 2:
                conflict_line[path] = number
    photos = [LabelledPhoto(path, found[0]) for path, found in names.items() if len(found) == 1]
    conflicts = [Conflict(path, tuple(found), conflict_line[path]) for path, found in names.items() if len(found) > 1]
    return photos, conflicts

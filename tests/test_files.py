"""runtime.files: folders are replaced in one step, and the previous one is gone afterwards."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runtime.files import exchange_paths, publish_folder
from threads import run_threads


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "marker").write_text(text)
    return path


def test_exchange_swaps_two_folders(tmp_path):
    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    if not exchange_paths(a, b):
        pytest.skip("this file system cannot swap paths in one step (renameat2 RENAME_EXCHANGE)")
    assert (a / "marker").read_text() == "B" and (b / "marker").read_text() == "A"


def test_publish_folder_replaces_whole_and_leaves_nothing_behind(tmp_path):
    out = publish_folder(_folder(tmp_path / ".new1", "1"), tmp_path / "repo")
    (out / "stale").write_text("from the first version")
    publish_folder(_folder(tmp_path / ".new2", "2"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert sorted(p.name for p in out.iterdir()) == ["marker"] and (out / "marker").read_text() == "2"


def test_readers_never_find_the_folder_missing_while_it_is_replaced(tmp_path):
    probe = _folder(tmp_path / "x", "x")
    if not exchange_paths(probe, _folder(tmp_path / "y", "y")):
        pytest.skip("this file system cannot swap paths in one step (renameat2 RENAME_EXCHANGE)")
    out = publish_folder(_folder(tmp_path / ".new", "0"), tmp_path / "repo")
    stop, missing, looks = threading.Event(), [], [0]

    def replace_or_read(k: int) -> None:
        if k == 0:  # the writer
            try:
                for i in range(100):
                    publish_folder(_folder(tmp_path / f".new{i}", str(i)), out)
            finally:
                stop.set()
            return
        while not stop.is_set():  # the reader
            looks[0] += 1
            if not (out / "marker").is_file():
                missing.append(looks[0])

    run_threads(replace_or_read, 2, timeout=120)
    assert looks[0] > 100 and not missing, f"{len(missing)} of {looks[0]} looks found no folder"
    assert (out / "marker").read_text() == "99"

"""The runtime's optional dependencies: whether a module imports, and a progress bar that works without tqdm."""
from __future__ import annotations

import sys

from runtime.optional_imports import importable
from runtime.progress import progress_bar


def test_a_bar_only_when_asked_for_or_on_a_terminal(capsys):
    with progress_bar(4, desc="working", unit="photo", enabled=True) as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "working" in err and "4/4" in err and "photo" in err
    for enabled in (False, None):  # None: stderr is captured here, so not a terminal
        with progress_bar(4, desc="quiet", enabled=enabled) as bar:
            bar.update(4)
    assert capsys.readouterr().err == ""


def test_without_tqdm_the_bar_is_a_no_op(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now fails as if it were not installed
    with progress_bar(2, desc="working", initial=1, enabled=True) as bar:
        bar.update(1)
    assert capsys.readouterr().err == ""


def test_importable_says_whether_an_import_works(monkeypatch):
    assert importable("json") and importable("os.path")
    assert not importable("facekit_no_such_module") and not importable("json.no_such_submodule")
    monkeypatch.setitem(sys.modules, "json", None)  # what a broken install looks like to `import`
    assert not importable("json")

"""runtime.indexer / ``python -m runtime index``: inputs, the gallery and manifest, failure reasons, resuming
after SIGKILL, several processes, and work-folder safety."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, need
from runtime.cli import main
from runtime.gallery import Gallery
from runtime.indexer import (IndexingError, IndexJob, IndexPlan, entries_from_list, entries_from_tree, in_processes,
                             run_index)
from runtime.pipeline import FacePipeline

PEOPLE, PER_PERSON, SHARD = 4, 3, 2


def celeba_people(facekit_data: Path, people: int, per_person: int) -> dict[str, list[str]]:
    """The first ``people`` identities of celeba/wild (by id) with their first ``per_person`` files."""
    labels = need(facekit_data / "celeba" / "identity_wild.txt")
    by_id: dict[str, list[str]] = {}
    for line in labels.read_text().splitlines():
        if line.strip():
            name, ident = line.split()
            if name not in by_id.setdefault(ident, []):
                by_id[ident].append(name)
    ids = sorted((i for i, files in by_id.items() if len(files) >= per_person), key=int)[:people]
    return {i: sorted(by_id[i])[:per_person] for i in ids}


@pytest.fixture(scope="module")
def tree(facekit_data, tmp_path_factory) -> Path:
    """A folder-per-person tree of celeba/wild photos (symlinks), plus a person whose files all fail."""
    wild = need(facekit_data / "celeba" / "wild")
    root = tmp_path_factory.mktemp("people")
    for ident, files in celeba_people(facekit_data, PEOPLE, PER_PERSON).items():
        (root / f"p{ident}").mkdir()
        for f in files:
            (root / f"p{ident}" / f).symlink_to(wild / f)
    bad = root / "zz_bad"
    bad.mkdir()
    (bad / "text.jpg").write_text("not an image")
    import cv2

    cv2.imwrite(str(bad / "blank.png"), np.full((200, 200, 3), 90, np.uint8))
    return root


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """An uninterrupted in-process run over ``tree``: (summary, gallery, manifest lines)."""
    out = tmp_path_factory.mktemp("reference") / "gallery.npz"
    plan = IndexPlan(entries_from_tree(tree), IndexJob(str(tree)), shard_size=SHARD)
    summary = run_index(plan, out, progress=False)
    return summary, Gallery.load(out), Path(summary.manifest).read_text().splitlines()


def assert_same_gallery(a: Gallery, b: Gallery) -> None:
    assert a.names == b.names
    for name in a.names:
        ea, eb = a.embeddings(name), b.embeddings(name)
        assert ea.shape == eb.shape
        assert float(np.min(np.sum(ea * eb, axis=1))) >= 0.99999


def test_tree_index_gives_sorted_people_subject_embeddings_and_reasons(tree, reference):
    summary, gallery, lines = reference
    names = sorted(p.name for p in tree.iterdir() if p.name != "zz_bad")
    assert gallery.names == names and summary.enrolled_people == PEOPLE
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)  # name, then path order
    assert summary.images == len(records) == PEOPLE * PER_PERSON + 2
    bad = {r["file"]: r for r in records if r["name"] == "zz_bad"}
    assert bad["zz_bad/text.jpg"]["status"] == "error" and bad["zz_bad/text.jpg"]["reason"].startswith("not an image")
    assert bad["zz_bad/blank.png"] == {"file": "zz_bad/blank.png", "name": "zz_bad", "faces": 0,
                                       "status": "skipped", "reason": "no face"}
    assert set(summary.failures) == {"no face", bad["zz_bad/text.jpg"]["reason"]}
    pipe = FacePipeline()
    for name in names:
        ok = [r for r in records if r["name"] == name and r["status"] == "ok"]
        assert all(r["faces"] >= 1 and len(r["face"]["box"]) == 4 for r in ok)
        expected = np.stack([pipe.subject_face(str(tree / r["file"])).embedding for r in ok])
        assert float(np.min(np.sum(gallery.embeddings(name) * expected, axis=1))) >= 0.99999
    assert not Path(str(summary.gallery) + ".parts").exists()  # the work folder is removed at the end


def test_list_file_over_celeba_wild_reports_missing_files(facekit_data, tmp_path, capsys):
    wild = need(facekit_data / "celeba" / "wild")
    people = celeba_people(facekit_data, 2, 2)
    lines = [f"{f} {ident}" for ident, files in people.items() for f in files]
    listing = tmp_path / "list.txt"
    listing.write_text("# file id\n" + "\n".join(lines + [lines[0], "999999.jpg 1"]) + "\n")  # a repeat, a gap
    rc = main(["index", str(wild), "--list", str(listing), "--out", str(tmp_path / "g.npz"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["images"] == 5 and summary["failures"] == {"file not found": 1}
    assert Gallery.load(tmp_path / "g.npz").names == sorted(people) and summary["enrolled_people"] == 2
    manifest = [json.loads(x) for x in (tmp_path / "g.manifest.jsonl").read_text().splitlines()]
    assert manifest[0] == {"file": "999999.jpg", "name": "1", "faces": 0, "status": "error",
                           "reason": "file not found"}


def test_list_file_errors_name_the_line(tmp_path):
    listing = tmp_path / "l.txt"
    for text, message in [("a.jpg\n", "l.txt:1: expected"), ("a.jpg x\na.jpg y\n", "l.txt:2: 'a.jpg' is listed as"),
                          ("../a.jpg x\n", "below the image folder"), ("# only a comment\n", "no entries")]:
        listing.write_text(text)
        with pytest.raises(IndexingError, match=message):
            entries_from_list(listing)
    with pytest.raises(IndexingError, match="cannot read"):
        entries_from_list(tmp_path / "none.txt")


def test_flat_folder_without_a_list_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "g.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--list" in err and len(err.splitlines()) == 1


def _index_cmd(tree: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "runtime", "index", str(tree), "--out", str(out), "--shard-size", str(SHARD),
            "--no-progress", "--json"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_gallery(tree, reference, tmp_path):
    out = tmp_path / "g.npz"
    parts = tmp_path / "g.npz.parts"
    shards = -(-(PEOPLE * PER_PERSON + 2) // SHARD)
    proc = subprocess.Popen(_index_cmd(tree, out), cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(parts.glob("shard-*.npz"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the indexer finished before it could be killed"
    done = len(list(parts.glob("shard-*.npz")))
    assert 2 <= done < shards and not out.exists()
    r = subprocess.run(_index_cmd(tree, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["reused_shards"] == done and summary["computed_shards"] == shards - done
    _, expected, manifest = reference
    resumed = Gallery.load(out)
    assert_same_gallery(resumed, expected)
    for name in expected.names:  # same settings, same shards: the very same numbers
        assert np.array_equal(resumed.embeddings(name), expected.embeddings(name))
    assert (tmp_path / "g.manifest.jsonl").read_text().splitlines() == manifest
    assert not parts.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_two_processes_give_the_in_process_gallery(tree, reference, tmp_path):
    plan = IndexPlan(entries_from_tree(tree), IndexJob(str(tree)), shard_size=SHARD)
    summary = run_index(plan, tmp_path / "g.npz", compute=in_processes(2), progress=False)
    _, expected, manifest = reference
    assert_same_gallery(Gallery.load(tmp_path / "g.npz"), expected)
    assert Path(summary.manifest).read_text().splitlines() == manifest


def test_work_folder_safety_other_plan_lock_and_bad_shards(tree, tmp_path):
    entries = entries_from_tree(tree)[:3]  # one and a half shards: quick
    plan = IndexPlan(entries, IndexJob(str(tree)), shard_size=SHARD)
    out, work = tmp_path / "g.npz", tmp_path / "work"
    first = run_index(plan, out, work=work, keep_parts=True, progress=False)
    assert first.computed_shards == 2 and (work / "shard-000001.npz").is_file()
    other = IndexPlan(entries[:2], IndexJob(str(tree)), shard_size=SHARD)
    with pytest.raises(IndexingError, match="different index run"):
        run_index(other, out, work=work, progress=False)
    (work / "shard-000001.npz").write_bytes(b"garbage")  # e.g. damaged by hand: recomputed, not trusted
    logged = []
    again = run_index(plan, out, work=work, keep_parts=True, progress=False, log=logged.append)
    assert (again.reused_shards, again.computed_shards) == (1, 1) and "unreadable shard" in logged[0]
    with open(work / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexingError, match="another indexer"):
            run_index(plan, out, work=work, progress=False)
    restarted = run_index(other, out, work=work, restart=True, progress=False)
    assert restarted.computed_shards == 1 and restarted.images == 2 and not work.exists()

"""runtime.gallery: enrol/identify/remove, unknown rejection, safe save/load, SIGKILL during save, threads."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.gallery import Gallery, GalleryError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gallery_kill_writer as writer  # noqa: E402
from gallery_concurrency import enrol_while_identifying  # noqa: E402

DIM = 64


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def people():
    """10 people, each with a centre and 3 noisy enrolment embeddings (cosine to centre ≈ 0.9)."""
    rng = np.random.default_rng(7)
    centres = _unit(rng.standard_normal((10, DIM)))
    samples = {f"p{i}": _unit(centres[i] + 0.25 * _unit(rng.standard_normal((3, DIM)))) for i in range(10)}
    return centres, samples, rng


def test_enroll_identify_topk_and_unknown(people):
    centres, samples, rng = people
    g = Gallery(threshold=0.5)
    for name, emb in samples.items():
        assert g.enroll(name, emb) == 3
    assert len(g) == 10 and g.names == [f"p{i}" for i in range(10)] and g.num_embeddings == 30
    for i in range(10):
        query = _unit(centres[i] + 0.2 * _unit(rng.standard_normal(DIM)))
        (name, sim), = g.identify(query)
        assert name == f"p{i}" and 0.5 <= sim <= 1.0
        top = g.identify(query, top_k=4)
        assert len(top) == 4 and top[0][0] == f"p{i}"
        sims = [s for _, s in top]
        assert sims == sorted(sims, reverse=True)
        assert all(n is None for n, s in top[1:] if s < 0.5)
    stranger = _unit(rng.standard_normal(DIM))
    (name, sim), = g.identify(stranger)
    assert name is None and sim < 0.5
    (name, _), = g.identify(stranger, threshold=-1.0)  # per-call threshold override
    assert name is not None
    assert len(g.identify(stranger, top_k=50)) == 10


def test_best_match_per_person_and_normalisation():
    g = Gallery(threshold=0.9)
    a1, a2, b = np.eye(3, dtype=np.float32) * 5  # not unit length: enroll normalises
    g.enroll("a", np.stack([a1, a2]))
    g.enroll("b", b)
    assert np.allclose(np.linalg.norm(g.embeddings("a"), axis=1), 1)
    (name, sim), = g.identify(a2 * 0.1)  # the second enrolment of "a" matches exactly
    assert name == "a" and sim == pytest.approx(1.0)
    g.enroll("b", [0.0, 0.6, 0.8])  # enrolling an existing name adds to it
    assert len(g.embeddings("b")) == 2 and len(g) == 2


def test_remove_and_errors():
    g = Gallery(threshold=0.3)
    assert g.identify(np.ones(4, np.float32)) == [(None, -1.0)]  # empty gallery
    g.enroll("x", np.ones(4, np.float32))
    g.enroll("y", np.array([1, -1, 1, -1], np.float32))
    assert g.remove("x") == 1 and g.names == ["y"] and "x" not in g
    with pytest.raises(KeyError):
        g.remove("x")
    with pytest.raises(GalleryError, match="dimensions"):
        g.enroll("z", np.ones(5, np.float32))
    with pytest.raises(GalleryError, match="zero-length"):
        g.enroll("z", np.zeros(4, np.float32))
    with pytest.raises(GalleryError, match="NaN"):
        g.enroll("z", np.full(4, np.nan, np.float32))
    with pytest.raises(GalleryError, match="name"):
        g.enroll("", np.ones(4, np.float32))
    with pytest.raises(GalleryError, match="pipeline"):
        g.enroll("z", np.zeros((8, 8, 3), np.uint8))  # an image without a pipeline
    with pytest.raises(GalleryError, match="threshold"):
        Gallery().identify(np.ones(4, np.float32))
    with pytest.raises(ValueError):
        g.identify(np.ones(4, np.float32), top_k=0)


def test_save_load_round_trip(tmp_path, people):
    _, samples, rng = people
    g = Gallery(threshold=0.42)
    for name, emb in samples.items():
        g.enroll(name, emb)
    g.enroll('quote"d / ünï ✓', _unit(rng.standard_normal((2, DIM))))
    path = g.save(tmp_path / "sub" / "people.npz")
    h = Gallery.load(path)
    assert h.names == g.names and h.threshold == 0.42 and h.dim == DIM
    for name in g.names:
        assert np.array_equal(h.embeddings(name), g.embeddings(name))
    queries = _unit(rng.standard_normal((20, DIM)))
    assert [g.identify(q, top_k=3) for q in queries] == [h.identify(q, top_k=3) for q in queries]
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert {z[k].dtype.kind for k in z.files} <= {"f", "i", "u"}
    assert [p.name for p in path.parent.iterdir()] == ["people.npz"]  # no temporaries left


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(GalleryError, match="not found"):
        Gallery.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(GalleryError, match="cannot read"):
        Gallery.load(tmp_path / "text.npz")
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    with pytest.raises(GalleryError, match="not a facekit gallery"):
        Gallery.load(tmp_path / "foreign.npz")
    np.savez(tmp_path / "pickled.npz", embeddings=np.array([{"x": 1}], dtype=object), owner=np.zeros(1),
             meta=np.zeros(1))
    with pytest.raises(GalleryError, match="cannot read"):
        Gallery.load(tmp_path / "pickled.npz")
    g = Gallery(threshold=0.3)
    g.enroll("a", np.ones(4, np.float32))
    path = g.save(tmp_path / "ok.npz")
    with np.load(path) as z:
        emb, owner, meta = z["embeddings"].copy(), z["owner"], z["meta"]
    emb[0, 0] += 0.5  # tamper without updating the checksum
    np.savez(tmp_path / "tampered.npz", embeddings=emb, owner=owner, meta=meta)
    with pytest.raises(GalleryError, match="checksum"):
        Gallery.load(tmp_path / "tampered.npz")
    meta_d = json.loads(meta.tobytes())
    meta_d["version"] = 99
    np.savez(tmp_path / "future.npz", embeddings=emb, owner=owner,
             meta=np.frombuffer(json.dumps(meta_d).encode(), np.uint8))
    with pytest.raises(GalleryError, match="newer"):
        Gallery.load(tmp_path / "future.npz")
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryError, match="cannot read"):
        Gallery.load(tmp_path / "cut.npz")


def _loaded_version(path: Path, base: np.ndarray) -> int:
    """Load ``path`` and check it is exactly one complete version written by the writer; return it."""
    g = Gallery.load(path)
    v = round(g.threshold * 1000)
    ref = writer.make_version(v, base)
    assert g.names == ref.names, f"names of version {v} do not match"
    for name in ref.names:
        assert np.array_equal(g.embeddings(name), ref.embeddings(name)), f"embeddings of version {v} differ"
    return v


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks writers (POSIX only)")
def test_sigkill_during_save_50_times_leaves_a_loadable_gallery(tmp_path):
    base = writer.base_embeddings()
    path = tmp_path / "gallery.npz"
    writer.make_version(0, base).save(path)
    rnd = random.Random(0)
    t0 = time.monotonic()

    def kill_one(version: int) -> bool:
        pid = zygote.kill_writer("go", path, version, rnd.uniform(0.002, 0.08))  # a save takes ~10-20 ms here
        return any(p.name.startswith(f".{path.name}.{pid}.") for p in tmp_path.iterdir())

    with writer.Zygote() as zygote:
        last, killed_mid_write = writer.kill_rounds(50, kill_one, lambda: _loaded_version(path, base))
    print(f"\n50 SIGKILLs in {time.monotonic() - t0:.1f} s; {killed_mid_write} struck mid-write (left a temporary); "
          f"{last} versions completed")
    writer.make_version(last + 1, base).save(path)  # the next save cleans the killed writers' temporaries
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.npz"]


def test_concurrent_identify_never_sees_half_enrolment():
    rng = np.random.default_rng(3)
    n_people, per_person = 150, 4
    vecs = _unit(rng.standard_normal((n_people, per_person, DIM)))
    g = Gallery(threshold=0.99)
    enrol_while_identifying(g, vecs)
    assert len(g) == n_people and g.num_embeddings == n_people * per_person


def test_empty_gallery_round_trip_and_remove_last(tmp_path):
    g = Gallery(threshold=0.5)
    h = Gallery.load(g.save(tmp_path / "empty.npz"))
    assert len(h) == 0 and h.identify(np.ones(3, np.float32)) == [(None, -1.0)]
    h.enroll("a", np.ones(3, np.float32))
    h.remove("a")
    h.enroll("b", np.ones(3, np.float32))
    assert h.identify(np.ones(3, np.float32))[0][0] == "b"
    k = Gallery.load(h.save(tmp_path / "one.npz"))
    assert k.names == ["b"] and k.dim == 3


def test_one_by_one_enrolment_grows_its_buffers_geometrically():
    """3000 single enrolments reallocate the row buffers a logarithmic number of times (amortised doubling),
    not once each: enrolment stays linear in the rows added, never quadratic."""
    rng = np.random.default_rng(5)
    g = Gallery(threshold=0.5)
    vecs = _unit(rng.standard_normal((3000, 128)))
    buffers: list[np.ndarray] = []  # every distinct row buffer, kept alive so none can be mistaken for another
    for i in range(3000):
        g.enroll(f"p{i}", vecs[i])
        if not buffers or g._buffers[0] is not buffers[-1]:
            buffers.append(g._buffers[0])
    assert len(buffers) <= math.ceil(math.log2(3000 / 64)) + 1, [len(b) for b in buffers]
    for i in range(0, 3000, 30):
        assert g.identify(vecs[i])[0][0] == f"p{i}"


def test_enroll_and_identify_photos_through_a_pipeline(facekit_data, tmp_path):
    from conftest import need
    from runtime.image_io import ImageError
    from runtime.pipeline import FacePipeline
    from test_pipeline import make_recognizer

    pipe = FacePipeline(recognizer=str(make_recognizer(tmp_path / "tiny.onnx", threshold=0.5)))
    photos = {n: str(need(facekit_data / "photos" / f"{n}.jpg")) for n in ("obama", "biden", "paul_rudd")}
    g = Gallery()  # no threshold of its own: the recognizer's (0.5) applies
    for name, path in photos.items():
        assert g.enroll(name, [path], pipeline=pipe) == 1
    for name, path in photos.items():
        (got, sim), = g.identify(path)
        assert got == name and sim == pytest.approx(1.0, abs=1e-4)
    blank = tmp_path / "blank.png"
    blank.write_bytes(__import__("cv2").imencode(".png", np.full((80, 80, 3), 128, np.uint8))[1].tobytes())
    assert g.identify(str(blank)) == []  # no face: nothing to identify
    (tmp_path / "note.jpg").write_text("not a photo")
    before = g.num_embeddings
    with pytest.raises(GalleryError, match="blank.png: no face"):
        g.enroll("someone", [photos["obama"], str(blank)])
    with pytest.raises(ImageError, match="note.jpg"):
        g.enroll("someone", [photos["obama"], str(tmp_path / "note.jpg")])
    assert g.num_embeddings == before and "someone" not in g  # a failed enrolment adds nothing
    h = Gallery.load(g.save(tmp_path / "g.npz"), pipeline=pipe)
    assert h.identify(photos["biden"])[0][0] == "biden"

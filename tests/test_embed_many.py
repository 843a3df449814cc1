"""FacePipeline.embed_many and runtime.batching: order, equality with embed, per-image errors, batching of
the recognizer, bounded read-ahead on an endless input, early stop."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from benchmarks.memory import status_mib
from conftest import ROOT, need
from runtime.batching import ordered_batches
from runtime.pipeline import FacePipeline, ImageFaces
from runtime.subject import NO_FACE

# ------------------------------------------------------------------------------------- ordered_batches


def test_ordered_batches_keeps_order_and_closes_batches_by_weight():
    batches = []

    def process(batch):
        batches.append(list(batch))
        return [x * 10 for x in batch]

    def prepare(x):
        time.sleep(0.002 * (x % 3))  # finishing out of order must not reorder the results
        return x

    out = list(ordered_batches(range(20), prepare, process, weight=lambda x: 2 if x % 5 == 0 else 1,
                               batch_size=4, workers=3, window=8))
    assert out == [x * 10 for x in range(20)]
    assert [x for b in batches for x in b] == list(range(20))
    for b in batches[:-1]:  # closed as soon as the weight reaches 4
        w = [2 if x % 5 == 0 else 1 for x in b]
        assert sum(w) >= 4 and sum(w[:-1]) < 4
    again = []
    list(ordered_batches(range(20), prepare, lambda b: again.append(list(b)) or b, weight=lambda x: 2 if x % 5 == 0
                         else 1, batch_size=4, workers=1, window=8))
    assert again == batches  # composition depends on the input only, not on timing or threads


def test_ordered_batches_zero_weight_items_are_bounded_by_the_window():
    sizes = []
    out = list(ordered_batches(range(25), lambda x: x, lambda b: sizes.append(len(b)) or b, weight=lambda x: 0,
                               batch_size=4, workers=0, window=10))
    assert out == list(range(25)) and sizes == [10, 10, 5]


def test_ordered_batches_propagates_errors_and_rejects_bad_sizes():
    def prepare(x):
        if x == 3:
            raise KeyError("boom")
        return x

    with pytest.raises(KeyError, match="boom"):
        list(ordered_batches(range(10), prepare, lambda b: b, weight=lambda x: 1, batch_size=2, workers=2, window=4))
    with pytest.raises(RuntimeError, match="2 results for 1"):
        list(ordered_batches([1], lambda x: x, lambda b: b * 2, weight=lambda x: 1, batch_size=1, workers=0, window=1))
    with pytest.raises(ValueError, match="batch_size"):
        list(ordered_batches([1], lambda x: x, lambda b: b, weight=lambda x: 1, batch_size=0, workers=0, window=1))


def test_ordered_batches_reads_at_most_window_items_ahead_of_an_endless_input():
    pulled = itertools.count()
    taken = []

    def endless():
        while True:
            taken.append(next(pulled))
            yield taken[-1]

    gen = ordered_batches(endless(), lambda x: x, lambda b: b, weight=lambda x: 1, batch_size=5, workers=2, window=12)
    for i, x in enumerate(itertools.islice(gen, 200)):
        assert x == i
        assert len(taken) - (i + 1) < 12  # items read but not yet yielded stay below the window
    assert _prepare_threads()
    gen.close()  # the consumer stops: the pool's threads end
    assert not _prepare_threads()


def _prepare_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prepare") and t.is_alive()]


# ------------------------------------------------------------------------------------------ embed_many


@pytest.fixture(scope="module")
def lfw_files(facekit_data) -> list[str]:
    images = sorted((need(facekit_data / "lfw" / "images")).glob("*/*.jpg"))
    return [str(p) for p in images[:24]]


def _min_cos(a: list, b: list) -> float:
    return min(float(np.dot(x.embedding, y.embedding)) for x, y in zip(a, b))


def test_embed_many_matches_embed_in_order_with_errors_in_place(pipe, lfw_files, facekit_data, tmp_path):
    group = str(need(facekit_data / "photos" / "group_t1.jpg"))
    (tmp_path / "text.jpg").write_text("not an image")
    blank = np.full((200, 200, 3), 127, np.uint8)
    inputs = lfw_files[:10] + [str(tmp_path / "missing.jpg"), group, str(tmp_path / "text.jpg"), blank] \
        + lfw_files[10:14]
    results = list(pipe.embed_many(inputs, batch_size=8, workers=2))
    assert [r.index for r in results] == list(range(len(inputs)))
    assert all(isinstance(r, ImageFaces) for r in results)
    assert results[10].error == "file not found" and results[10].source.endswith("missing.jpg")
    assert results[12].error.startswith("not an image")
    assert results[13].ok and results[13].faces == []  # a photo without a face is a result, not an error
    assert len(results[11].faces) == 6
    for i, (src, r) in enumerate(zip(inputs, results)):
        if i in (10, 12, 13):
            continue
        assert r.ok, r.error
        ref = pipe.embed(src)
        assert len(r.faces) == len(ref) >= 1
        assert all(f.embedding is not None for f in r.faces)
        np.testing.assert_allclose([f.box for f in r.faces], [f.box for f in ref], atol=1e-4)
        assert _min_cos(r.faces, ref) >= 0.99999


def test_embed_many_subject_mode_embeds_find_subjects_face(pipe, facekit_data):
    group = str(need(facekit_data / "photos" / "group_t1.jpg"))
    portrait = str(need(facekit_data / "photos" / "obama.jpg"))
    blank = np.zeros((240, 240, 3), np.uint8)
    results = list(pipe.embed_many([group, blank, portrait], subject=True, workers=0))
    for src, r in zip([group, portrait], [results[0], results[2]]):
        found = pipe.find_subject(src)
        assert r.face is not None and r.reason == ""
        np.testing.assert_allclose(r.face.box, found.face.box, atol=1e-4)
        assert sum(f.embedding is not None for f in r.faces) == 1  # only the subject is embedded
        assert float(np.dot(r.face.embedding, pipe.subject_face(src).embedding)) >= 0.99999
    assert results[1].ok and results[1].face is None and results[1].reason == NO_FACE
    tiny = list(pipe.embed_many([portrait], subject=True, min_face=10_000))[0]
    assert tiny.face is None and tiny.reason == "face too small"


def test_embed_many_batches_faces_of_many_images_into_one_recognizer_call(lfw_files):
    pipe = FacePipeline()
    model = pipe.recognizer
    sizes = []
    run = model.run

    def counting_run(x):
        sizes.append(len(x))
        return run(x)

    model.run = counting_run  # observe the real backend's calls
    try:
        results = list(pipe.embed_many(lfw_files[:20], batch_size=16, workers=2))
    finally:
        del model.run
    faces = sum(len(r.faces) for r in results)
    assert faces >= 20 and sum(sizes) == 2 * faces  # flip test: each batch and its mirror image
    assert len(sizes) <= 2 * -(-faces // 16) and max(sizes) >= 16


def test_embed_many_on_an_endless_generator_has_bounded_memory(pipe, lfw_files):
    taken = []

    def endless():
        for path in itertools.cycle(lfw_files[:4]):
            taken.append(path)
            yield path

    def rss_kb() -> float:
        return status_mib("VmRSS") * 1024

    window = 12
    gen = pipe.embed_many(endless(), batch_size=6, workers=2, window=window)
    rss = []
    for i, r in enumerate(itertools.islice(gen, 48)):
        assert r.index == i and r.ok and r.faces
        assert len(taken) - (i + 1) < window
        if i in (16, 47):
            rss.append(rss_kb())
    gen.close()
    assert not _prepare_threads()
    assert rss[1] - rss[0] < 50_000  # no growth with the number of images (kB)


def test_embed_many_refuses_a_lone_path_at_the_call(pipe, tmp_path):
    with pytest.raises(TypeError, match="iterable of images"):
        pipe.embed_many(str(tmp_path / "photo.jpg"))


@pytest.mark.slow
def test_throughput_benchmark_reports_both_paths_and_their_agreement(facekit_data, tmp_path):
    need(facekit_data / "lfw" / "images")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--no-write", "throughput",
                           "--images", "6", "--rounds", "2", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    e = res["embed"]
    assert e["photos"] == 6 and e["faces"] >= 6 and e["errors"] == [] and e["face_count_mismatches"] == 0
    assert e["min_cosine"] >= 0.99999 and e["speedup"] > 0
    assert e["one_at_a_time"]["photos_per_s"] > 0 and e["embed_many"]["faces_per_s"] > 0
    assert res["machine"]["cpu"] and res["machine"]["cores"] >= 1


def _sqrt_of_mean_recognizer(path) -> str:
    """A 4-d 'recognizer' that gives NaN for crops darker than mid-grey: sqrt(mean of the input tensor)."""
    onnx = pytest.importorskip("onnx", reason="building the test model needs onnx")
    from onnx import TensorProto, helper

    from runtime.metadata import encode_metadata
    from runtime.preprocess import PreprocessSpec

    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m1"]),
             helper.make_node("Sqrt", ["m1"], ["s"]),
             helper.make_node("MatMul", ["s", "ones"], ["embedding"])]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
             helper.make_tensor("ones", TensorProto.FLOAT, [1, 4], [1.0, 1.0, 1.0, 1.0])]
    graph = helper.make_graph(nodes, "sqrt_mean", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["batch", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, encode_metadata({"task": "recognition", "preprocess": PreprocessSpec().to_dict(),
                                                   "embedding_size": 4}))
    onnx.save(model, str(path))
    return str(path)


def test_a_recognizer_failure_on_one_image_fails_only_that_image(lfw_files, tmp_path):
    import cv2

    pipe = FacePipeline(recognizer=_sqrt_of_mean_recognizer(tmp_path / "sqrt.onnx"))
    photo = cv2.imread(lfw_files[0])
    bright, dark = (photo // 2 + 128).astype(np.uint8), (photo // 2).astype(np.uint8)
    results = list(pipe.embed_many([bright, dark, bright], batch_size=8, workers=0))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.startswith("recognizer failed:") and "NaN" in results[1].error
    assert all(f.embedding is not None for r in (results[0], results[2]) for f in r.faces)

"""FacePipeline: alignment geometry, metadata-driven preprocessing, embedding, compare, threads, no torch.

Most tests use a tiny random-weight ONNX recognizer built here with the ``onnx`` helper API (fast, and
its preprocessing metadata can be set at will); tests of the shipped recognizer skip when it is absent.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import need, run_python
from threads import run_threads
from runtime.backends.base import ModelLoadError
from runtime.geometry import ARCFACE_TEMPLATE_112
from runtime.image_io import ImageError
from runtime.metadata import ModelMetadataError, encode_metadata
from runtime.pipeline import DEFAULT_RECOGNIZER, Face, FacePipeline, NoFaceError
from runtime.preprocess import PreprocessSpec, l2_normalize, to_model_input
from runtime.shipped import RECOGNIZER_INT8


def make_recognizer(path: Path, spec: PreprocessSpec = PreprocessSpec(), dim: int = 32, seed: int = 0,
                    threshold: float | None = 0.5, metadata: bool = True, task: str = "recognition",
                    batch: int | str = "batch") -> Path:
    """A tiny random-weight recognizer ONNX (Conv 16×16/16 → Flatten → MatMul) with facekit metadata; ``batch``
    an int fixes the batch axis."""
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    feat = 8 * (h // 16) * (w // 16)
    conv_w = rng.normal(0, 0.05, (8, 3, 16, 16)).astype(np.float32)
    fc_w = rng.normal(0, 0.1, (feat, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], strides=[16, 16]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "fc_w"], ["embedding"]),
    ]
    inits = [helper.make_tensor("conv_w", TensorProto.FLOAT, conv_w.shape, conv_w.ravel().tolist()),
             helper.make_tensor("fc_w", TensorProto.FLOAT, fc_w.shape, fc_w.ravel().tolist())]
    graph = helper.make_graph(nodes, "tiny_recognizer",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, h, w])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        meta = {"task": task, "preprocess": spec.to_dict(), "embedding_size": dim, "arch": "tiny-test"}
        if threshold is not None:
            meta["threshold_cosine"] = threshold
        helper.set_model_props(model, encode_metadata(meta))
    path.write_bytes(model.SerializeToString())
    return path


def make_channel_probe(path: Path, color_order: str) -> Path:
    """A 'recognizer' whose embedding is the mean of each input channel: shows what the runtime feeds it."""
    spec = PreprocessSpec(color_order=color_order)
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 112, 112])],
                              [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, encode_metadata({"task": "recognition", "preprocess": spec.to_dict(), "embedding_size": 3}))
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def tiny_recognizer(tmp_path_factory) -> Path:
    return make_recognizer(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="module")
def pipe(tiny_recognizer) -> FacePipeline:
    return FacePipeline(recognizer=str(tiny_recognizer))


def _photo(facekit_data, name) -> Path:
    return need(facekit_data / "photos" / name)


# ------------------------------------------------------------------------------------------ geometry


def _dot_centroids(img: np.ndarray, approx: np.ndarray, radius: int = 6) -> np.ndarray:
    """Intensity-weighted centroid of the bright dot near each approximate position."""
    g = img.astype(np.float64).mean(axis=2)
    out = []
    for x, y in approx:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = g[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1]
        win = np.where(win > 0.1 * win.max(), win, 0)
        ys, xs = np.mgrid[0:win.shape[0], 0:win.shape[1]]
        out.append([x0 + (xs * win).sum() / win.sum(), y0 + (ys * win).sum() / win.sum()])
    return np.array(out)


def _render_dots(points: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), np.float64)
    for x, y in points:
        img += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_known_warp_lands_points_on_template_within_half_pixel(pipe):
    angle, scale, t = np.deg2rad(23.0), 2.7, np.array([180.0, 95.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_TEMPLATE_112.astype(np.float64) @ rot.T + t  # the template under a known similarity
    image = _render_dots(landmarks, (480, 520), sigma=2.7 * 1.5)
    crop = pipe.align(image, landmarks.astype(np.float32))
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    found = _dot_centroids(crop, ARCFACE_TEMPLATE_112)
    err = np.linalg.norm(found - ARCFACE_TEMPLATE_112, axis=1)
    assert err.max() < 0.5, err


def test_metadata_template_and_size_decide_the_crop(tmp_path):
    """A recognizer whose metadata declares another framing (dlib's 150×150 chip) gets crops of that size
    with the landmarks on its template, not on the ArcFace one."""
    from runtime.geometry import DLIB_CHIP_TEMPLATE_150
    from runtime.preprocess import DLIB_CHIP_SPEC

    pipe = FacePipeline(recognizer=str(make_recognizer(tmp_path / "chip.onnx", DLIB_CHIP_SPEC)))
    angle, t = np.deg2rad(-17.0), np.array([140.0, 120.0])
    rot = 2.2 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = DLIB_CHIP_TEMPLATE_150.astype(np.float64) @ rot.T + t
    crop = pipe.align(_render_dots(landmarks, (480, 520), sigma=2.2 * 1.5), landmarks.astype(np.float32))
    assert crop.shape == (150, 150, 3)
    err = np.linalg.norm(_dot_centroids(crop, DLIB_CHIP_TEMPLATE_150) - DLIB_CHIP_TEMPLATE_150, axis=1)
    assert err.max() < 0.5, err


@pytest.mark.parametrize("template", [[[10, 10], [60, 10], [35, 40], [15, 300], [55, 60]],  # outside the crop
                                      [[70, 50], [40, 50], [56, 70], [40, 90], [70, 90]],  # eyes swapped
                                      [[40, 50], [70, 50], [56, 70]]])  # three points
def test_unusable_metadata_template_is_refused(tmp_path, template):
    spec = PreprocessSpec(template=tuple(map(tuple, template)))
    with pytest.raises(ModelMetadataError, match="template"):
        FacePipeline(recognizer=str(make_recognizer(tmp_path / "bad.onnx", spec)))


def test_align_keeps_the_colour_order(pipe, facekit_data):
    img = cv2.imread(str(_photo(facekit_data, "obama.jpg")))
    lm = pipe.detect(img)[0].landmarks
    bgr = pipe.align(img, lm)
    rgb = pipe.align(img[..., ::-1].copy(), lm, color_order="RGB")
    np.testing.assert_array_equal(bgr[..., ::-1], rgb)
    with pytest.raises(ValueError, match="5, 2"):
        pipe.align(img, lm[:4])


# --------------------------------------------------------------------------------------- embeddings


def test_detect_embed_shapes_and_normalisation(pipe, facekit_data):
    path = _photo(facekit_data, "group_t1.jpg")
    faces = pipe.detect(str(path))
    assert len(faces) == 6 and all(isinstance(f, Face) and f.embedding is None for f in faces)
    embedded = pipe.embed(path)
    assert len(embedded) == 6
    emb = np.stack([f.embedding for f in embedded])
    assert emb.shape == (6, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # batched embedding equals one-by-one embedding of the same crops
    img = cv2.imread(str(path))
    crops = np.stack([pipe.align(img, f.landmarks) for f in embedded])
    one_by_one = np.concatenate([pipe.embed_aligned(c, batch_size=1) for c in crops])
    np.testing.assert_allclose(pipe.embed_aligned(crops, batch_size=4), one_by_one, atol=1e-5)
    np.testing.assert_allclose(one_by_one, emb, atol=1e-5)
    # bytes and paths give the same faces as arrays
    from_bytes = pipe.embed(path.read_bytes())
    np.testing.assert_allclose(from_bytes[0].embedding, embedded[0].embedding, atol=1e-6)


def test_embed_aligned_colour_order_and_size_checks(pipe):
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    bgr = pipe.embed_aligned(crops)
    rgb = pipe.embed_aligned(crops[..., ::-1], color_order="RGB")
    np.testing.assert_allclose(bgr, rgb, atol=1e-6)
    assert not np.allclose(bgr, pipe.embed_aligned(crops[..., ::-1]))  # colour order matters
    with pytest.raises(ValueError, match="112"):
        pipe.embed_aligned(np.zeros((1, 100, 100, 3), np.uint8))
    assert pipe.embed_aligned([]).shape[0] == 0


def test_flip_test_sums_the_crop_and_its_mirror(pipe):
    """Default embeddings are normalise(model(crop) + model(mirror)), the benchmark protocol the shipped
    threshold comes from; flip_test=False gives the single pass. Checked against the raw model."""
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    raw = lambda c: pipe.recognizer.run(to_model_input(c, pipe.spec, color_order="BGR"))[0]
    summed = raw(crops) + raw(np.ascontiguousarray(crops[:, :, ::-1]))
    assert pipe.flip_test is True
    np.testing.assert_allclose(pipe.embed_aligned(crops, batch_size=2), l2_normalize(summed), atol=1e-5)
    single = FacePipeline(recognizer=pipe.recognizer, flip_test=False)
    np.testing.assert_allclose(single.embed_aligned(crops), l2_normalize(raw(crops)), atol=1e-5)
    assert not np.allclose(single.embed_aligned(crops), pipe.embed_aligned(crops), atol=1e-3)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_fixed_batch_model_embeds_any_number_of_crops(tmp_path, tiny_recognizer, backend, monkeypatch):
    """A model exported with batch 4 is always run with 4 rows (the backends refuse others; OpenVINO's bf16
    check on a bf16 CPU included); 1, 4, 7 and 9 crops give the embeddings the same weights give with a
    dynamic batch, in the pipeline and the parity benchmark's embedder."""
    from benchmarks.parity import BackendEmbedder

    monkeypatch.setenv("FACEKIT_CACHE", str(tmp_path / "cache"))  # no bf16 verdict kept from an earlier run
    fixed = make_recognizer(tmp_path / "fixed4.onnx", batch=4)
    crops = np.random.default_rng(5).integers(0, 256, (9, 112, 112, 3), dtype=np.uint8)
    dynamic = FacePipeline(recognizer=str(tiny_recognizer), backend=backend)
    four = FacePipeline(recognizer=str(fixed), backend=backend)
    assert four.recognizer.fixed_batch == 4 and dynamic.recognizer.fixed_batch is None
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        four.recognizer.run(to_model_input(crops[:3], four.spec, color_order="BGR"))
    for n in (1, 4, 7, 9):
        np.testing.assert_allclose(four.embed_aligned(crops[:n], batch_size=3), dynamic.embed_aligned(crops[:n]),
                                   atol=1e-6)
    np.testing.assert_allclose(BackendEmbedder(fixed, backend)(crops[:7]), BackendEmbedder(tiny_recognizer, backend)(crops[:7]),
                               atol=1e-5)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_metadata_colour_order_reaches_the_model(tmp_path, order):
    p = FacePipeline(recognizer=str(make_channel_probe(tmp_path / f"probe_{order}.onnx", order)))
    pure_blue_bgr = np.zeros((1, 112, 112, 3), np.uint8)
    pure_blue_bgr[..., 0] = 255
    raw = p.recognizer.run(np.zeros((1, 3, 112, 112), np.float32))[0]
    assert raw.shape == (1, 3)
    emb = p.embed_aligned(pure_blue_bgr)[0]  # normalised (ch0, ch1, ch2) means of (x-127.5)/127.5
    blue_channel = 0 if order == "BGR" else 2
    assert emb[blue_channel] > 0 and all(emb[c] < 0 for c in range(3) if c != blue_channel)
    assert p.spec.color_order == order


def test_compare_uses_largest_faces_and_threshold(pipe, facekit_data):
    a, b = _photo(facekit_data, "obama.jpg"), _photo(facekit_data, "biden.jpg")
    same = pipe.compare(a, a)
    assert same.similarity == pytest.approx(1.0, abs=1e-5) and same.same is True
    r = pipe.compare(a, b)
    assert -1.0 <= r.similarity <= 1.0
    assert r.same == (r.similarity >= pipe.threshold) and r.threshold == 0.5
    assert set(r.to_dict()) == {"similarity", "same"}
    assert set(pipe.providers) == {"detector", "recognizer"}
    assert pipe.providers == {"detector": pipe.detector.backend.device, "recognizer": pipe.recognizer.device}
    assert all(v in ("CPUExecutionProvider", "CUDAExecutionProvider") or v.startswith("OpenVINO CPU")
               for v in pipe.providers.values()), pipe.providers
    with pytest.raises(NoFaceError, match="no face"):
        pipe.compare(a, np.zeros((200, 200, 3), np.uint8))


def test_threshold_override_and_missing_threshold(tiny_recognizer, tmp_path):
    assert FacePipeline(recognizer=str(tiny_recognizer), threshold=0.9).threshold == 0.9
    p = FacePipeline(recognizer=str(make_recognizer(tmp_path / "nothr.onnx", threshold=None)))
    assert p.threshold is None


# --------------------------------------------------------------------------------------- bad models/input


def test_bad_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        FacePipeline(recognizer=str(tmp_path / "missing.onnx"))
    (tmp_path / "trunc.onnx").write_bytes(make_recognizer(tmp_path / "ok.onnx").read_bytes()[:200])
    with pytest.raises(ModelLoadError):
        FacePipeline(recognizer=str(tmp_path / "trunc.onnx"))
    with pytest.raises(ModelMetadataError, match="no 'facekit' metadata"):
        FacePipeline(recognizer=str(make_recognizer(tmp_path / "nometa.onnx", metadata=False)))
    with pytest.raises(ModelMetadataError, match="not a recognizer"):
        FacePipeline(recognizer=str(make_recognizer(tmp_path / "lm.onnx", task="landmarks")))
    # without metadata, explicit preprocessing is accepted
    p = FacePipeline(recognizer=str(tmp_path / "nometa.onnx"), preprocess=PreprocessSpec())
    assert p.embed_aligned(np.zeros((1, 112, 112, 3), np.uint8)).shape == (1, 32)


def test_missing_default_recognizer_is_a_clear_error():
    if DEFAULT_RECOGNIZER.is_file():
        pytest.skip("the shipped recognizer exists")
    p = FacePipeline()  # detection works without a recognizer
    assert p.detect(np.zeros((64, 64, 3), np.uint8)) == []
    with pytest.raises(ModelLoadError, match="default recognizer .* is missing"):
        p.embed_aligned(np.zeros((1, 112, 112, 3), np.uint8))


def test_bad_image_input_raises_image_error(pipe, tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="text.jpg"):
        pipe.detect(str(tmp_path / "text.jpg"))
    with pytest.raises((ImageError, FileNotFoundError)):
        pipe.embed(str(tmp_path / "missing.jpg"))
    assert pipe.detect(np.zeros((1, 1, 3), np.uint8)) == []


# ------------------------------------------------------------------------------------------ threads


def test_four_threads_sharing_one_pipeline_give_identical_embeddings(tiny_recognizer, facekit_data):
    pipe = FacePipeline(recognizer=str(tiny_recognizer))
    paths = [_photo(facekit_data, n) for n in ("obama.jpg", "biden.jpg", "group_t1.jpg", "two_people.jpg")]
    images = [cv2.imread(str(p)) for p in paths]
    reference = [np.stack([f.embedding for f in pipe.embed(im)]) for im in images]
    results: dict[tuple[int, int], np.ndarray] = {}

    def work(tid: int) -> None:
        for rep in range(3):
            for i in range(len(images)):
                j = (i + tid) % len(images)
                results[(tid, rep * 10 + j)] = np.stack([f.embedding for f in pipe.embed(images[j])])

    run_threads(work, 4)
    assert len(results) == 4 * 3 * len(images)
    for (_, key), emb in results.items():
        np.testing.assert_array_equal(emb, reference[key % 10])


def test_lazy_default_loading_is_thread_safe(tiny_recognizer):
    pipe = FacePipeline(recognizer=str(tiny_recognizer))
    pipe._recognizer = None  # as if the default were to be loaded on first use
    seen = []
    run_threads(lambda _: seen.append(pipe.recognizer), 4)
    assert len({id(m) for m in seen}) == 1


# ---------------------------------------------------------------------------------------- torch-free


def test_import_runtime_does_not_import_torch():
    code = ("import sys, runtime, runtime.pipeline, runtime.detector, runtime.cli; "
            "from runtime import FacePipeline, Face; "
            "print('torch' in sys.modules, 'torchvision' in sys.modules)")
    assert run_python(code).stdout.strip() == "False False"


# ------------------------------------------------------------------------------------ shipped models


@pytest.fixture(scope="module")
def shipped() -> FacePipeline:
    if not DEFAULT_RECOGNIZER.is_file():
        pytest.skip(f"the shipped recognizer {DEFAULT_RECOGNIZER} does not exist yet")
    return FacePipeline()


def test_shipped_recognizer_verifies_obama_and_biden(shipped, facekit_data):
    obama, obama2, biden = (_photo(facekit_data, n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))
    assert shipped.threshold is not None
    same = shipped.compare(obama, obama2)
    assert same.same is True
    assert shipped.compare(obama2, biden).same is False
    assert shipped.compare(obama, biden).same is False
    # and by a margin: the default's cosines sit high (raw dlib descriptors, threshold 0.915)
    assert shipped.compare(obama, biden).similarity < same.similarity - 0.05
    assert shipped.providers["recognizer"]


def test_shipped_aligner_landmarks_agree_with_the_detector(facekit_data):
    from runtime.pipeline import DEFAULT_ALIGNER

    if not DEFAULT_ALIGNER.is_file():
        pytest.skip(f"the shipped aligner {DEFAULT_ALIGNER} does not exist yet")
    det = FacePipeline(landmarks="detector")
    ali = FacePipeline(landmarks="aligner")
    for name in ("obama.jpg", "biden.jpg", "kate_siegel.jpg"):
        a, b = det.detect(_photo(facekit_data, name))[0], ali.detect(_photo(facekit_data, name))[0]
        width = float(a.box[2] - a.box[0])
        assert np.abs(a.landmarks - b.landmarks).max() < 0.15 * width
    assert "aligner" in ali.providers


def test_shipped_models_identify_enrolled_portraits(shipped, facekit_data, tmp_path):
    from runtime.gallery import Gallery

    portraits = ["angelina_jolie", "biden", "kate_siegel", "obama", "paul_rudd", "shea_whigham"]
    gallery = Gallery(threshold=shipped.threshold)
    for name in portraits:
        gallery.enroll(name, [_photo(facekit_data, f"{name}.jpg")], pipeline=shipped)
    gallery.save(tmp_path / "people.npz")
    reloaded = Gallery.load(tmp_path / "people.npz")
    for name in portraits:
        assert reloaded.identify(_photo(facekit_data, f"{name}.jpg"), pipeline=shipped)[0][0] == name
    # a second photo of an enrolled person is recognised too
    assert reloaded.identify(_photo(facekit_data, "obama2.jpg"), pipeline=shipped)[0][0] == "obama"


def test_shipped_int8_recognizer_matches_the_fp32_one(shipped, facekit_data):
    """recognizer_int8.onnx declares the same framing and threshold as the default and embeds the same faces
    alike (its export guard required cosine ≥ 0.98 on LFW)."""
    int8 = RECOGNIZER_INT8
    if not int8.is_file():
        pytest.skip("no shipped INT8 recognizer")
    quant = FacePipeline(recognizer=str(int8))
    assert quant.spec == shipped.spec and quant.threshold == shipped.threshold
    for name in ("obama.jpg", "biden.jpg", "kate_siegel.jpg"):
        a, b = shipped.embed(_photo(facekit_data, name))[0], quant.embed(_photo(facekit_data, name))[0]
        assert float(a.embedding @ b.embedding) > 0.98

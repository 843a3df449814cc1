"""Face detector: prior boxes, decoding, NMS, SCRFD decoding, and the default RetinaFace on real photos."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import need
from runtime.backends.base import ModelLoadError
from runtime.detector import (
    RETINAFACE_MIN_SIZES,
    RETINAFACE_STEPS,
    Detection,
    RetinaFaceDetector,
    SCRFDDetector,
    decode_boxes,
    decode_landmarks,
    decode_scrfd,
    detection_scale,
    load_detector,
    nms,
    prior_boxes,
    scrfd_anchor_centers,
)

PORTRAITS = ["angelina_jolie.jpg", "biden.jpg", "kate_siegel.jpg", "obama.jpg", "obama2.jpg", "paul_rudd.jpg",
             "shea_whigham.jpg"]


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return load_detector()


def _read(facekit_data, name):
    img = cv2.imread(str(need(facekit_data / "photos" / name)))
    assert img is not None, name
    return img


# ------------------------------------------------------------------------------------------- pure numpy parts


def test_prior_boxes_count_order_and_geometry():
    h, w = 100, 150
    priors = prior_boxes(h, w)
    expected = sum(-(-h // s) * -(-w // s) * len(m) for s, m in zip(RETINAFACE_STEPS, RETINAFACE_MIN_SIZES))
    assert priors.shape == (expected, 4)
    # first cell of stride 8: centre (4, 4), sizes 16 then 32; the next cell moves along x
    np.testing.assert_allclose(priors[0], [4, 4, 16, 16])
    np.testing.assert_allclose(priors[1], [4, 4, 32, 32])
    np.testing.assert_allclose(priors[2], [12, 4, 16, 16])
    # the first anchor of stride 16 follows the last of stride 8
    n8 = -(-h // 8) * -(-w // 8) * 2
    np.testing.assert_allclose(priors[n8 - 1], [(19 - 0.5) * 8, (13 - 0.5) * 8, 32, 32])
    np.testing.assert_allclose(priors[n8], [8, 8, 64, 64])
    # last anchor is the 512 box of the last stride-32 cell
    np.testing.assert_allclose(priors[-1], [(5 - 0.5) * 32, (4 - 0.5) * 32, 512, 512])
    assert not priors.flags.writeable  # cached arrays are shared between threads


def test_decode_inverts_the_retinaface_encoding():
    rng = np.random.default_rng(0)
    priors = prior_boxes(64, 64)
    gt = np.stack([priors[:, 0] - 10, priors[:, 1] - 7, priors[:, 0] + 14, priors[:, 1] + 9], 1)
    centre, size = (gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]
    loc = np.concatenate([(centre - priors[:, :2]) / (0.1 * priors[:, 2:]), np.log(size / priors[:, 2:]) / 0.2], 1)
    np.testing.assert_allclose(decode_boxes(loc, priors), gt, atol=1e-3)
    pts = priors[:, None, :2] + rng.uniform(-20, 20, (len(priors), 5, 2))
    enc = ((pts - priors[:, None, :2]) / (0.1 * priors[:, None, 2:])).reshape(len(priors), 10)
    np.testing.assert_allclose(decode_landmarks(enc, priors), pts, atol=1e-3)


def test_nms_keeps_best_of_overlapping_and_all_disjoint():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5], [21, 20, 31, 30]], float)
    scores = np.array([0.6, 0.9, 0.8, 0.7, 0.5])
    keep = nms(boxes, scores, 0.4)
    assert keep.tolist() == [1, 2]  # 0 and 3 overlap box 1 (IoU ≈ 0.68), 4 overlaps box 2
    assert nms(boxes, scores, 0.99).tolist() == [1, 2, 3, 0, 4]
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []
    # IoU exactly at the threshold is kept apart (suppression needs IoU > threshold)
    two = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], float)  # IoU = 50/150
    assert nms(two, np.array([1.0, 0.9]), 1 / 3 + 1e-9).tolist() == [0, 1]
    assert nms(two, np.array([1.0, 0.9]), 1 / 3 - 1e-6).tolist() == [0]


def test_detection_scale_upscales_small_and_caps_large():
    assert detection_scale(160, 160, 640, 320) == pytest.approx(2.0)
    assert detection_scale(4000, 3000, 640, 320) == pytest.approx(640 / 4000)
    assert detection_scale(100, 2000, 640, 320) == pytest.approx(640 / 2000)  # the cap wins
    assert detection_scale(480, 640, 640, 320) == 1.0


# --------------------------------------------------------------------------------------------------- SCRFD


def _scrfd_outputs(h, w, faces, num_anchors=2, with_kps=True):
    """Synthetic SCRFD outputs (insightface order: 3 scores, 3 boxes, 3 kps) encoding ``faces``:
    each (stride, cell_y, cell_x, anchor, box x1y1x2y2, 5×2 points)."""
    scores, boxes, kps = [], [], []
    for stride in (8, 16, 32):
        n = -(-h // stride) * -(-w // stride) * num_anchors
        scores.append(np.full((n, 1), 0.01, np.float32))
        boxes.append(np.ones((n, 4), np.float32))
        kps.append(np.zeros((n, 10), np.float32))
    for stride, cy, cx, a, box, pts in faces:
        k = (8, 16, 32).index(stride)
        fw = -(-w // stride)
        row = (cy * fw + cx) * num_anchors + a
        px, py = cx * stride, cy * stride
        scores[k][row] = 0.95
        boxes[k][row] = np.array([px - box[0], py - box[1], box[2] - px, box[3] - py]) / stride
        kps[k][row] = ((np.asarray(pts) - [px, py]) / stride).ravel()
    return scores + boxes + (kps if with_kps else [])


def test_scrfd_anchor_centers_row_major_repeated():
    c = scrfd_anchor_centers(32, 48, 16, 2)
    assert c.shape == (2 * 3 * 2, 2)
    np.testing.assert_allclose(c[:6], [[0, 0], [0, 0], [16, 0], [16, 0], [32, 0], [32, 0]])
    np.testing.assert_allclose(c[6], [0, 16])


def test_scrfd_decoder_on_synthetic_outputs():
    h, w = 96, 128
    pts = np.array([[40, 40], [60, 41], [50, 52], [42, 62], [58, 63]], np.float32)
    faces = [(16, 3, 3, 1, (30, 25, 70, 75), pts), (32, 1, 3, 0, (80, 10, 120, 60), pts + [50, 0])]
    outs = _scrfd_outputs(h, w, faces)
    groups = [(8, 0, 3, 6), (16, 1, 4, 7), (32, 2, 5, 8)]
    boxes, scores, points = decode_scrfd(outs, groups, h, w)
    hits = np.flatnonzero(scores > 0.5)
    order = hits[np.argsort(boxes[hits, 0])]
    np.testing.assert_allclose(boxes[order[0]], [30, 25, 70, 75], atol=1e-4)
    np.testing.assert_allclose(points[order[0]], pts, atol=1e-4)
    np.testing.assert_allclose(boxes[order[1]], [80, 10, 120, 60], atol=1e-4)
    np.testing.assert_allclose(points[order[1]], pts + [50, 0], atol=1e-4)
    assert len(hits) == 2
    # batched output shapes (1, N, C) decode the same
    b2, s2, p2 = decode_scrfd([o[None] for o in outs], groups, h, w)
    np.testing.assert_array_equal(b2, boxes)
    # a model without the landmark head: same boxes, landmarks NaN
    b3, s3, p3 = decode_scrfd(_scrfd_outputs(h, w, faces, with_kps=False), [(s, a, b, None) for s, a, b, _ in groups], h, w)
    np.testing.assert_array_equal(b3, boxes)
    assert np.isnan(p3).all()


def test_scrfd_with_one_anchor_per_point():
    h = w = 64
    pts = np.array([[20, 20], [40, 21], [30, 30], [22, 40], [38, 41]], np.float32)
    outs = _scrfd_outputs(h, w, [(8, 3, 4, 0, (15, 10, 50, 52), pts)], num_anchors=1)
    boxes, scores, points = decode_scrfd(outs, [(8, 0, 3, 6), (16, 1, 4, 7), (32, 2, 5, 8)], h, w)
    assert len(scores) == 64 + 16 + 4
    best = int(np.argmax(scores))
    np.testing.assert_allclose(boxes[best], [15, 10, 50, 52], atol=1e-4)


def _constant_detector_onnx(outputs: list[np.ndarray], size: int) -> bytes:
    """A fixed-size ONNX model that ignores its pixels (beyond a ×0 term) and emits ``outputs``."""
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    outs = []
    for i, arr in enumerate(outputs):
        inits.append(helper.make_tensor(f"c{i}", TensorProto.FLOAT, arr.shape, arr.ravel().tolist()))
        nodes.append(helper.make_node("Add", [f"c{i}", "z"], [f"out{i}"]))
        outs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "const_det", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_load_detector_picks_scrfd_and_maps_back_to_the_image(tmp_path):
    size = 64
    pts = np.array([[20, 20], [40, 21], [30, 30], [22, 40], [38, 41]], np.float32)
    outs = _scrfd_outputs(size, size, [(8, 4, 4, 0, (12, 10, 48, 54), pts)])
    path = tmp_path / "scrfd.onnx"
    path.write_bytes(_constant_detector_onnx(outs, size))
    det = load_detector(str(path))
    assert isinstance(det, SCRFDDetector)
    image = np.zeros((128, 96, 3), np.uint8)  # fixed 64×64 input: scale 0.5, padded on the right
    faces = det.detect(image)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, np.array([12, 10, 48, 54]) * 2, atol=1e-3)
    np.testing.assert_allclose(faces[0].landmarks, pts * 2, atol=1e-3)
    assert faces[0].score == pytest.approx(0.95)


def test_load_detector_rejects_a_model_that_is_no_detector(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(_constant_detector_onnx([np.zeros((1, 7), np.float32)], 32))
    with pytest.raises(ModelLoadError, match="not a face detector"):
        load_detector(str(bogus))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError):
        load_detector(str(broken))
    with pytest.raises(ModelLoadError, match="not found"):
        load_detector(str(tmp_path / "missing.onnx"))


# ------------------------------------------------------------------------------------- RetinaFace, real photos


def test_group_photo_has_six_faces(facekit_data, detector):
    faces = detector.detect(_read(facekit_data, "group_t1.jpg"))
    assert len(faces) == 6
    assert all(isinstance(f, Detection) for f in faces)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


@pytest.mark.parametrize("name", PORTRAITS)
def test_each_portrait_has_one_face_with_landmarks_inside(facekit_data, detector, name):
    img = _read(facekit_data, name)
    faces = detector.detect(img)
    assert len(faces) == 1
    f = faces[0]
    assert f.box.shape == (4,) and f.box.dtype == np.float32
    assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
    x1, y1, x2, y2 = f.box
    assert 0 <= x1 < x2 <= img.shape[1] and 0 <= y1 < y2 <= img.shape[0]
    lm = f.landmarks
    assert np.all((lm[:, 0] >= x1) & (lm[:, 0] <= x2) & (lm[:, 1] >= y1) & (lm[:, 1] <= y2))
    # LANDMARK_NAMES order as seen in the image: eyes above the nose above the mouth, left before right
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])


def test_large_image_is_downscaled_and_mapped_back(facekit_data, detector):
    img = _read(facekit_data, "obama.jpg")
    ref = detector.detect(img, max_side=640)[0]
    big = cv2.resize(img, None, fx=3.0, fy=3.0, interpolation=cv2.INTER_LINEAR)  # 3072 px: detected at 640
    got = detector.detect(big)
    assert len(got) == 1
    face_size = float(ref.box[2] - ref.box[0])
    np.testing.assert_allclose(got[0].box, ref.box * 3, atol=0.03 * face_size * 3)
    np.testing.assert_allclose(got[0].landmarks, ref.landmarks * 3, atol=0.03 * face_size * 3)


def test_small_close_up_is_upscaled_and_found(facekit_data, detector):
    img = _read(facekit_data, "obama.jpg")
    f = detector.detect(img)[0]
    x1, y1, x2, y2 = f.box.astype(int)
    pad = int(0.25 * (x2 - x1))
    crop = img[max(0, y1 - pad):y2 + pad, max(0, x1 - pad):x2 + pad]
    small = cv2.resize(crop, (120, int(120 * crop.shape[0] / crop.shape[1])), interpolation=cv2.INTER_AREA)
    faces = detector.detect(small)
    assert len(faces) == 1
    b = faces[0].box
    assert (b[2] - b[0]) > 0.5 * small.shape[1]  # the face fills most of the crop


def test_grayscale_and_blank_images(detector):
    assert detector.detect(np.zeros((200, 300, 3), np.uint8)) == []
    assert detector.detect(np.full((1, 1, 3), 128, np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((20, 20, 3), np.float32))


def test_detection_to_dict_is_json_friendly(facekit_data, detector):
    import json

    d = detector.detect(_read(facekit_data, "biden.jpg"))[0].to_dict()
    assert set(d) == {"box", "score", "landmarks"}
    assert len(d["box"]) == 4 and len(d["landmarks"]) == 5 and all(len(p) == 2 for p in d["landmarks"])
    json.dumps(d)


def test_user_retinaface_file_with_a_fixed_input_size(facekit_data, detector, tmp_path):
    import onnx

    from runtime.detector import DEFAULT_DETECTOR

    model = onnx.load(str(DEFAULT_DETECTOR))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, (1, 3, 320, 320)):
        d.ClearField("dim_param")
        d.dim_value = v
    path = tmp_path / "retinaface_320.onnx"
    path.write_bytes(model.SerializeToString())
    fixed = load_detector(str(path))
    assert isinstance(fixed, RetinaFaceDetector) and fixed.fixed_size == (320, 320)
    img = _read(facekit_data, "obama.jpg")  # 1024×820: letterboxed into 320×320
    got = fixed.detect(img)
    ref = detector.detect(img, max_side=320)
    assert len(got) == 1 == len(ref)
    np.testing.assert_allclose(got[0].box, ref[0].box, atol=0.02 * float(ref[0].box[2] - ref[0].box[0]))

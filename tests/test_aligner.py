"""The hourglass aligner: heatmap coding, crop geometry, flip swap, NME, a training step, ONNX parity."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from evaluation.landmarks import failure_rate, nme, per_landmark_nme
from runtime.geometry import FLIP_PAIRS, transform_points
from runtime.landmarks import (
    AlignerGeometry,
    crop_face,
    crop_matrix,
    crop_to_heatmap,
    decode_heatmaps,
    encode_heatmaps,
    eye_angle,
    heatmap_to_crop,
)
from tests.conftest import ROOT, need, run_python
from train.aligner_loop import heatmap_loss
from train.hourglass import build_aligner
from train.landmark_data import Augmenter, make_batch

SMALL = {"stacks": 2, "channels": 16, "depth": 2, "input_size": [64, 64], "heatmap_size": [16, 16], "sigma": 1.5}


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.5])
def test_heatmap_round_trip_is_sub_pixel(sigma):
    rng = np.random.default_rng(int(sigma * 10))
    pts = rng.uniform(1.0, 30.0, size=(64, 5, 2))  # away from the border column/row
    maps = np.stack([encode_heatmaps(p, (32, 32), sigma) for p in pts])
    assert maps.shape == (64, 5, 32, 32) and maps.dtype == np.float32
    decoded, peaks = decode_heatmaps(maps)
    assert np.abs(decoded - pts).max() < 0.1
    assert np.all(peaks > 0.5)


def test_round_trip_through_the_crop_to_image_pixels():
    """Image points → crop → heatmap → Gaussian → decode → crop → image: sub-pixel at stride 4."""
    g = AlignerGeometry()
    rng = np.random.default_rng(1)
    box = np.array([210.0, 130.0, 350.0, 310.0])
    pts = np.array([[250, 200], [310, 198], [281, 235], [256, 270], [305, 268]], float) + rng.normal(0, 2, (5, 2))
    m = crop_matrix(box, g, angle=0.3)
    hm = encode_heatmaps(crop_to_heatmap(transform_points(pts, m), g.stride), g.heatmap_size, g.sigma)
    dec, _ = decode_heatmaps(hm)
    back = transform_points(heatmap_to_crop(dec, g.stride), cv2.invertAffineTransform(m))
    assert np.abs(back - pts).max() < 0.1 * g.stride / (np.sqrt(np.linalg.det(m[:, :2])))


def test_decoding_noisy_maps_and_borders():
    rng = np.random.default_rng(2)
    pt = np.array([[12.3, 7.8]])
    noisy = encode_heatmaps(pt, (32, 32), 2.0) + rng.normal(0, 0.02, (1, 32, 32)).astype(np.float32)
    dec, _ = decode_heatmaps(noisy, blur_sigma=1.0)
    assert np.abs(dec - pt).max() < 0.3
    edge, _ = decode_heatmaps(encode_heatmaps(np.array([[0.0, 31.0]]), (32, 32), 1.5))
    assert np.allclose(edge, [[0.0, 31.0]])  # a peak on the border: argmax, no refinement
    outside = encode_heatmaps(np.array([[-20.0, 5.0]]), (32, 32), 1.5)
    assert outside.max() == 0  # a point far off the map leaves an empty target


def test_crop_centres_the_box_and_derotation_levels_the_eyes():
    g = AlignerGeometry()
    box = np.array([100.0, 50.0, 200.0, 170.0])
    m = crop_matrix(box, g)
    centre = transform_points([[150.0, 110.0 + g.center_shift * 120]], m)[0]
    assert np.allclose(centre, [(g.input_size[1] - 1) / 2, (g.input_size[0] - 1) / 2])
    side = g.crop_scale * (100 + 120) / 2
    assert np.isclose(np.sqrt(np.linalg.det(m[:, :2])), g.input_size[1] / side)
    eyes = np.array([[130.0, 100.0], [170.0, 120.0], [150, 130], [135, 150], [165, 160]])
    level = transform_points(eyes, crop_matrix(box, g, angle=eye_angle(eyes)))
    assert abs(level[0, 1] - level[1, 1]) < 1e-9 and level[0, 0] < level[1, 0]


def test_crop_face_shrinks_large_faces_without_moving_them():
    """The area-averaged path for big reductions keeps the geometry of the plain warp."""
    img = np.zeros((2000, 2400, 3), np.uint8)
    pt = np.array([1234.3, 987.6])
    cv2.circle(img, tuple(int(v * 16) for v in pt), 40 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    g = AlignerGeometry()
    m = crop_matrix(np.array([900.0, 700.0, 1600.0, 1500.0]), g, angle=0.3)
    crop = crop_face(img, m, g.input_size)[..., 0].astype(np.float64)
    ys, xs = np.mgrid[: g.input_size[0], : g.input_size[1]]
    centroid = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    assert np.abs(centroid - transform_points(pt, m)[0]).max() < 0.1


def test_flip_swaps_left_and_right():
    """A flipped training view labels as "left eye" the eye that now appears on the left: the one that
    was the right eye. Each landmark is painted a colour; after flipping, every label must sit on the
    colour of its mirror partner."""
    g = AlignerGeometry()
    pts = np.array([[130.0, 110.0], [176.0, 112.0], [152.0, 140.0], [134.0, 165.0], [172.0, 166.0]])
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    img = np.full((300, 300, 3), 60, np.uint8)
    for p, c in zip(pts, colours):
        cv2.circle(img, (int(p[0]), int(p[1])), 4, c, -1)
    box = np.array([100.0, 70.0, 205.0, 205.0])
    no_aug = {"rotation": 0, "scale": [1, 1], "translate": 0, "brightness": 0, "contrast": 0, "saturation": 0,
              "grayscale": 0, "blur": 0}
    plain, p_plain = Augmenter(g, {**no_aug, "flip": 0.0}, np.random.default_rng(0))(img, box, pts)
    flipped, p_flip = Augmenter(g, {**no_aug, "flip": 1.0}, np.random.default_rng(0))(img, box, pts)
    assert np.array_equal(flipped, plain[:, ::-1])
    partner = list(range(5))
    for a, b in FLIP_PAIRS:
        partner[a], partner[b] = b, a
    for k in range(5):
        x, y = np.round(p_flip[k]).astype(int)
        xo, yo = np.round(p_plain[partner[k]]).astype(int)
        assert np.array_equal(flipped[y, x], plain[yo, xo]), f"landmark {k} after the flip"
    assert p_flip[0, 0] < p_flip[1, 0] and p_flip[3, 0] < p_flip[4, 0]  # still left of right, as seen


def test_nme_and_failure_rate():
    gt = np.array([[[0, 0], [10, 0], [5, 5], [2, 9], [8, 9]]], float)
    assert np.allclose(nme(gt, gt), 0)
    shifted = gt + np.array([0.6, 0.8])  # every point 1 px off, inter-ocular distance 10
    assert np.allclose(nme(shifted, gt), 0.1)
    two = np.concatenate([gt * 2, gt])
    pred = two.copy()
    pred[0, 2] += [6.0, 8.0]  # one point 10 px off, inter-ocular 20: NME = 10 / 5 / 20
    assert np.allclose(nme(pred, two), [0.1, 0.0])
    assert np.allclose(per_landmark_nme(pred, two), [0, 0, 0.25, 0, 0])  # the nose: (10 / 20 + 0) / 2
    assert failure_rate(np.array([0.05, 0.1, 0.1001, 0.3])) == 0.5  # strictly above 10 %
    with pytest.raises(ValueError):
        nme(gt[:, :4], gt[:, :4])
    blind = gt.copy()
    blind[0, 1] = blind[0, 0]  # coincident eyes: no scale to divide by
    for metric in (nme, per_landmark_nme):
        with pytest.raises(ValueError, match="inter-ocular distance is zero"):
            metric(gt, blind)


def test_training_step_fits_a_batch(facekit_data):
    """A few optimiser steps on one batch of real 300-W faces lower the loss of every stack."""
    folder = need(facekit_data / "landmarks_300w" / "afw")
    g = AlignerGeometry.from_dict(SMALL)
    aug = Augmenter(g, {"rotation_p": 0.0, "flip": 0.0}, np.random.default_rng(0))
    crops, points = [], []
    for img_path in sorted(folder.glob("*.jpg"))[:4]:
        image = cv2.imread(str(img_path))
        gt = np.loadtxt(img_path.with_suffix(".pts5"))
        box = np.r_[gt.min(0) - 30, gt.max(0) + 30]
        crop, pts = aug(image, box, gt)
        crops.append(crop)
        points.append(pts)
    x, y, hm_points = make_batch(crops, points, g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only fight over the shared cores
    try:
        _fit_one_batch(x, y, hm_points)
    finally:
        torch.set_num_threads(threads)


def _fit_one_batch(x: torch.Tensor, y: torch.Tensor, points: torch.Tensor) -> None:
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 5, 16, 16)
    torch.manual_seed(0)
    model = build_aligner(SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    outs = model.forward_stacks(x)
    assert len(outs) == 2 and all(o.shape == y.shape for o in outs)
    first = [float(torch.nn.functional.mse_loss(o, y)) for o in outs]
    for _ in range(30):
        loss = heatmap_loss(model.forward_stacks(x), y, points, foreground_weight=10.0, coord_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = [float(torch.nn.functional.mse_loss(o, y)) for o in model.forward_stacks(x)]
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    model.eval()
    assert model(x).shape == y.shape  # forward: the last stack only (what is exported)


def test_soft_argmax_finds_the_gaussian_peak():
    """The training-only soft-argmax at the config's sharpness lands near the target; too soft a beta lets
    the background pull it towards the map centre (why beta is 20)."""
    from train.aligner_loop import soft_argmax

    pts = np.array([[[5.3, 7.7], [20.2, 11.1], [16.0, 16.0], [9.9, 25.4], [27.5, 3.6]]])
    maps = torch.from_numpy(encode_heatmaps(pts[0], (32, 32), 1.5)[None])
    assert np.abs(soft_argmax(maps, beta=20.0).numpy() - pts).max() < 0.2
    assert np.abs(soft_argmax(maps, beta=5.0).numpy() - pts).max() > 2.0


def test_build_aligner_checks_its_config():
    with pytest.raises(ValueError):
        build_aligner({"depth": 4, "input_size": [96, 96], "heatmap_size": [24, 24]})  # 24 not divisible by 16
    with pytest.raises(ValueError):
        AlignerGeometry(input_size=(128, 128), heatmap_size=(30, 30))


@pytest.mark.parametrize("module", ["runtime.landmarks", "evaluation.landmarks", "train.aligner",
                                    "benchmarks.landmarks"])
def test_landmark_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    run_python(code)


@pytest.mark.parametrize("flip_test", [False, True])
def test_exported_aligner_matches_pytorch(facekit_data, tmp_path, flip_test):
    """Checkpoint → ONNX (export/to_onnx.py --checkpoint) → LandmarkRefiner gives the PyTorch points."""
    from export.to_onnx import main as export_main
    from runtime.landmarks import LandmarkRefiner
    from train.aligner_refiner import TorchRefiner
    from train.checkpoint import save_checkpoint
    from train.hourglass import full_config

    photo = need(facekit_data / "photos" / "obama.jpg")
    torch.manual_seed(0)
    model = build_aligner(SMALL)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    rule = {"min_peak": -1.0, "max_disagreement": 1e9}  # carried into the export; never falls back here
    config = full_config({**SMALL, "flip_test": flip_test, "derotate": True, "fallback": rule})
    ckpt = save_checkpoint(tmp_path / "a.pt", {"model": model.state_dict(), "config": config})
    onnx_path = tmp_path / "a.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(onnx_path), "--batch", "1,3"]) == 0
    image = cv2.imread(str(photo))
    boxes = np.array([[338.6, 77.8, 543.9, 379.5], [300.0, 60.0, 560.0, 400.0]])
    init = np.array([[[400, 200], [480, 215], [440, 250], [410, 300], [470, 310]]] * 2, np.float32)
    torch_pts = TorchRefiner(ckpt).refine_many(image, boxes, init)
    # both engines at f32: this random network's flat heatmaps put its points anywhere at lower precision
    for options in ({"backend": "onnxruntime"}, {"backend": "openvino", "precision": "f32"}):
        refiner = LandmarkRefiner(str(onnx_path), **options)
        assert refiner.metadata["task"] == "landmarks" and refiner.geometry == AlignerGeometry.from_dict(config)
        assert refiner.metadata["fallback"] == rule and refiner.fallback == TorchRefiner(ckpt).fallback
        onnx_pts = refiner.refine_many(image, boxes, init)
        assert onnx_pts.shape == (2, 5, 2)
        assert np.abs(onnx_pts - torch_pts).max() < 0.05, options
        assert np.allclose(refiner.refine(image, boxes[0], init[0]), onnx_pts[0])
    assert not np.allclose(refiner.refine(image, boxes[0]), onnx_pts[0])  # derotation used the landmarks

    from train.aligner import load_refiner  # the file's kind picks the engine; fallback=False reaches both

    assert type(load_refiner(ckpt)) is TorchRefiner and type(load_refiner(onnx_path)) is LandmarkRefiner
    assert load_refiner(ckpt).fallback is not None and load_refiner(onnx_path).fallback is not None
    assert all(load_refiner(f, fallback=False).fallback is None for f in (ckpt, onnx_path))


SHIPPED = ROOT / "runtime" / "models" / "aligner.onnx"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="runtime/models/aligner.onnx not shipped yet")
def test_shipped_aligner_beats_the_detector_points(facekit_data):
    """On the first 60 faces of 300-W test the shipped aligner has a lower NME than the detector."""
    from evaluation.landmarks import evaluate_landmarks
    from runtime.landmarks import LandmarkRefiner

    test_dir = need(facekit_data / "landmarks_300w" / "test")
    sub = Path(test_dir)
    pairs = sorted(sub.glob("*.pts5"))[:60]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for pts in pairs:  # links, not copies
            for f in (pts, pts.with_suffix(".jpg")):
                (Path(tmp) / f.name).symlink_to(f)
        r = evaluate_landmarks(tmp, LandmarkRefiner(str(SHIPPED)), progress=False)
    assert r["images"] + r["missed"] == 60
    assert r["aligner"]["nme"] < r["detector"]["nme"], r


def test_flip_test_mirrors_back_and_cancels_a_horizontal_bias():
    """A stand-in network that finds painted landmarks (eyes red, nose green, mouth corners blue; left and
    right by position, as a trained aligner sees them) and reports every point 1 px too far right. The
    mirrored pass is biased the other way once mirrored back, so flip-test averaging removes the bias."""
    from runtime.landmarks import face_crop, predict_points

    g = AlignerGeometry(flip_test=False)
    gf = AlignerGeometry(flip_test=True)
    pts = np.array([[130.0, 110.0], [176.0, 112.0], [152.0, 140.0], [134.0, 165.0], [172.0, 166.0]])
    img = np.full((300, 300, 3), 40, np.uint8)
    for p, c in zip(pts, [(0, 0, 255), (0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 0, 0)]):  # BGR
        cv2.circle(img, (int(p[0]), int(p[1])), 3, c, -1)
    box = np.array([100.0, 70.0, 205.0, 205.0])

    def fake_run(x: np.ndarray) -> np.ndarray:
        maps = []
        for chw in x:
            rgb = chw.transpose(1, 2, 0) * 127.5 + 127.5
            found = []
            for channel in (0, 1, 2):  # red: eyes, green: nose, blue: mouth
                mask = ((rgb[..., channel] > 150) & (rgb.sum(-1) - rgb[..., channel] < 150)).astype(np.uint8)
                _, _, _, cents = cv2.connectedComponentsWithStats(mask)
                found += sorted(cents[1:].tolist())  # by x: left first
            p = np.array(found) + [1.0, 0.0]  # biased to the right
            maps.append(encode_heatmaps(crop_to_heatmap(p, g.stride), g.heatmap_size, 1.5))
        return np.stack(maps)

    crop, m = face_crop(img, box, g)
    plain = predict_points(fake_run, crop[None], m[None], g)[0]
    both = predict_points(fake_run, crop[None], m[None], gf)[0]
    scale = np.sqrt(np.linalg.det(m[:, :2]))
    assert np.allclose((plain - pts)[:, 0].mean(), 1.0 / scale, atol=0.35)  # the bias shows without flip
    assert np.abs((both - pts).mean(0)).max() < 0.15  # and cancels with it
    assert np.abs(both - pts).max() < 0.6

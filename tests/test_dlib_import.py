"""train/dlib_import.py: dlib's face ResNet read from its own file, run in PyTorch, agrees with dlib."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.geometry import DLIB_CHIP_TEMPLATE_150
from runtime.preprocess import DLIB_CHIP_SPEC
from train.backbones.dlib_resnet import INPUT_SIZE, DlibBlock, DlibResNet
from train.dlib_import import (DLIB_MEAN_RGB, DLIB_SCALE, DlibFormatError,
                               import_dlib_resnet, read_layers, state_dict_from_layers)
from train.dlib_models import DLIB_EMBEDDER, dlib_model_file


@pytest.fixture(scope="module")
def weights():
    try:
        return dlib_model_file(DLIB_EMBEDDER)
    except FileNotFoundError as e:
        pytest.skip(f"{e} (install the 'teacher' extra)")


def _random_layers(seed: int = 0) -> list:
    """dlib-shaped layers with random weights, in the file's order."""
    g = np.random.default_rng(seed)
    net = DlibResNet(128).state_dict()
    layers = []
    for k, v in net.items():
        if k.endswith(".weight") and k != "fc.weight":
            n = v.shape[0]
            layers.append(("con", {"w": g.normal(0, 0.05, tuple(v.shape)).astype(np.float32),
                                   "b": g.normal(0, 0.1, n).astype(np.float32)}))
            layers.append(("affine", {"gamma": g.uniform(0.5, 1.5, n).astype(np.float32),
                                      "beta": g.normal(0, 0.1, n).astype(np.float32)}))
    layers.append(("fc", {"w": g.normal(0, 0.05, (128, 256)).astype(np.float32)}))
    return layers


def test_stem_fold_reproduces_dlib_input_scaling_and_affine():
    """The stem on facekit's (p − 127.5)/127.5 input equals dlib's affine(conv((p − mean)/256)) exactly."""
    layers = _random_layers()
    model = DlibResNet(128)
    model.load_state_dict(state_dict_from_layers(layers))
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 150, 150, 3)).astype(np.float32))
    facekit = ((pixels - 127.5) / 127.5).permute(0, 3, 1, 2)
    dlib_in = ((pixels - torch.tensor(DLIB_MEAN_RGB)) / DLIB_SCALE).permute(0, 3, 1, 2)
    conv, aff = layers[0][1], layers[1][1]
    ref = F.conv2d(dlib_in, torch.from_numpy(conv["w"]), torch.from_numpy(conv["b"]), stride=2)
    ref = ref * torch.from_numpy(aff["gamma"])[None, :, None, None] + torch.from_numpy(aff["beta"])[None, :, None, None]
    out = model.stem(facekit)
    assert out.shape == (2, 32, 72, 72)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_strided_block_adds_zero_padded_branch_like_dlib_add_prev():
    """On an 8×8 map the unpadded stride-2 branch is 3×3 and the pooled shortcut 4×4: dlib adds them with the
    branch zero-padded at the bottom and right, and the shortcut zero-padded to the wider channel count."""
    torch.manual_seed(0)
    block = DlibBlock(2, 4, stride=2).eval()
    x = torch.rand(1, 2, 8, 8)
    with torch.no_grad():
        out = block(x)
        branch = block.conv2(F.relu(block.conv1(x)))
    pooled = F.avg_pool2d(x, 2, 2)
    assert out.shape == (1, 4, 4, 4) and branch.shape == (1, 4, 3, 3)
    assert torch.allclose(out[:, :2, 3, :], F.relu(pooled[:, :, 3, :]))  # last row: shortcut only
    assert torch.allclose(out[:, 2:, 3, :], torch.zeros(1, 2, 4))  # …and no shortcut in the new channels
    assert torch.allclose(out[:, :2, :3, :3], F.relu(branch[:, :2] + pooled[:, :, :3, :3]))


def test_centre_becomes_the_fc_bias():
    layers, centre = _random_layers(), np.linspace(-1, 1, 128).astype(np.float32)
    plain, centred = DlibResNet(128).eval(), DlibResNet(128, fc_bias=True).eval()
    plain.load_state_dict(state_dict_from_layers(layers))
    centred.load_state_dict(state_dict_from_layers(layers, centre))
    x = torch.rand(2, 3, 150, 150)
    with torch.no_grad():
        assert torch.allclose(centred(x), plain(x) - torch.from_numpy(centre), atol=1e-5)


def test_network_refuses_crops_smaller_than_dlibs():
    with pytest.raises(ValueError, match="150"):
        DlibResNet(128)(torch.zeros(1, 3, 112, 112))


def test_reads_the_real_file_into_the_network(weights):
    layers = read_layers(weights)
    assert [k for k, _ in layers].count("con") == 29 and layers[-1][0] == "fc"
    assert layers[0][1]["w"].shape == (32, 3, 7, 7) and layers[-1][1]["w"].shape == (128, 256)
    model = import_dlib_resnet(weights)
    assert sum(p.numel() for p in model.parameters()) == 5_607_488


@pytest.mark.parametrize("damage", ["foreign", "truncated"])
def test_foreign_or_truncated_file_is_refused(weights, tmp_path, damage):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x01\x05hello" * 100 if damage == "foreign" else weights.read_bytes()[:5_000_000])
    with pytest.raises(DlibFormatError):
        import_dlib_resnet(bad)


def test_port_agrees_with_dlib_on_its_own_chips(weights, facekit_data):
    """dlib's own descriptor of its 150×150 chips vs the PyTorch port fed the same chips."""
    dlib = pytest.importorskip("dlib")
    import cv2

    from runtime.preprocess import to_model_input
    from train.dlib_models import face_chip, load_dlib

    _, hog, predictor, embedder = load_dlib()
    chips = []
    for name in ("obama.jpg", "biden.jpg", "kate_siegel.jpg"):
        rgb = np.ascontiguousarray(cv2.imread(str(facekit_data / "photos" / name))[:, :, ::-1])
        chips.append(face_chip(dlib, predictor, rgb, max(hog(rgb, 1), key=lambda r: r.area())))
    ref = np.stack([np.asarray(embedder.compute_face_descriptor(c)) for c in chips])
    with torch.no_grad():
        out = import_dlib_resnet(weights)(torch.from_numpy(to_model_input(np.stack(chips), DLIB_CHIP_SPEC))).numpy()
    assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()


def test_spec_frames_faces_like_dlib_chips():
    assert DLIB_CHIP_SPEC.input_size == (INPUT_SIZE, INPUT_SIZE) == (150, 150)
    assert np.allclose(DLIB_CHIP_SPEC.crop_template, DLIB_CHIP_TEMPLATE_150)
    assert DLIB_CHIP_SPEC.mean == (127.5, 127.5, 127.5)  # dlib's own scaling lives in the stem


def test_shipped_recognizer_is_the_imported_network(weights):
    """runtime/models/recognizer.onnx is what `python -m train.dlib_import` + `export/to_onnx.py --fp16-weights`
    make: the outputs of the PyTorch import with its weights rounded to fp16, dlib's framing in its metadata."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.pipeline import DEFAULT_RECOGNIZER
    from runtime.metadata import preprocess_spec

    if not DEFAULT_RECOGNIZER.is_file():
        pytest.skip("no shipped recognizer")
    backend = OnnxRuntimeBackend(str(DEFAULT_RECOGNIZER), device="cpu")
    meta = backend.metadata
    assert meta["arch"] == "dlib_resnet" and meta["embedding_size"] == 128
    assert meta["weights"] == "checkpoint" and meta["weight_storage"] == "fp16"
    spec = preprocess_spec(meta)
    assert spec.input_size == (150, 150) and np.allclose(spec.crop_template, DLIB_CHIP_TEMPLATE_150)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 150, 150)).astype(np.float32)
    from export.fp16 import FP16_WEIGHTS_MIN_ELEMENTS

    model = import_dlib_resnet(weights)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() >= FP16_WEIGHTS_MIN_ELEMENTS:  # what with_fp16_weights stores as fp16
                p.copy_(p.half().float())
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(backend.run(x)[0] - ref).max() < 1e-4

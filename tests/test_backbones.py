"""Backbones: every architecture builds and embeds; MobileFaceNet and iResNet-50 match published sizes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from train.backbones import BACKBONES, build_backbone
from train.complexity import count_params_macs

EXPECTED_ARCHS = {"mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100",
                  "resnet34", "resnet50", "resnext50", "efficientnet_b0"}


def test_registry_has_the_contract_names():
    assert EXPECTED_ARCHS <= set(BACKBONES)


@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHS))
def test_every_backbone_embeds_a_batch(arch):
    torch.manual_seed(0)
    model = build_backbone(arch, embedding_size=96).eval()
    assert model.arch == arch and model.embedding_size == 96
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 96) and y.dtype == torch.float32
    # untrained models in eval mode stay finite and in a range fp16 export can represent
    assert torch.isfinite(y).all() and float(y.abs().max()) < 1e4


@pytest.mark.parametrize("arch", ["mobilefacenet", "iresnet18", "resnet34", "efficientnet_b0"])
def test_embeddings_depend_on_the_input(arch):
    # BN statistics calibrated on the batch (cumulative average) so that eval mode is meaningful
    torch.manual_seed(0)
    model = build_backbone(arch, embedding_size=32)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        model.train()(x)
        y = model.eval()(x)
    assert torch.isfinite(y).all()
    assert (y[0] - y[1]).abs().max() > 1e-3 * y.abs().max(), "different inputs must give different embeddings"


def test_mobilefacenet_trains_one_step():
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", 32).train()
    y = model(torch.randn(4, 3, 112, 112))
    y.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_arch_and_bad_embedding_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet999")
    with pytest.raises(ValueError, match="embedding_size"):
        build_backbone("mobilefacenet", embedding_size=0)
    with pytest.raises(TypeError, match="mobilefacenet"):
        build_backbone("mobilefacenet", no_such_option=1)


def test_complexity_counts_a_hand_checked_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    params, macs = count_params_macs(model, input_size=(10, 10))
    assert params == (8 * 27 + 8) + 16 + 8 + (8 * 9 + 8) + (200 * 4 + 4)
    assert macs == 8 * 100 * 27 + 8 * 25 * 9 + 200 * 4
    _, macs_all = count_params_macs(model, input_size=(10, 10), include_elementwise=True)
    assert macs_all == macs + 800 + 800  # BN and PReLU: one per output element


#: published sizes at 112×112: backbone, embedding size, parameter range, MAC range
PUBLISHED_SIZES = [
    ("mobilefacenet", 128, (0.95e6, 1.05e6), (0.21e9, 0.23e9)),  # Chen et al. 2018, table 1: 0.99 M, 221 M MAdds
    ("iresnet50", 512, (43.0e6, 44.2e6), (6.1e9, 6.5e9)),  # insightface arcface_torch r50: 43.6 M, 6.3 G FLOPs
]


@pytest.mark.parametrize("arch, dim, param_range, mac_range", PUBLISHED_SIZES, ids=[r[0] for r in PUBLISHED_SIZES])
def test_backbone_size_matches_its_publication(arch, dim, param_range, mac_range):
    params, macs = count_params_macs(build_backbone(arch, dim))
    assert param_range[0] <= params <= param_range[1], params
    assert mac_range[0] <= macs <= mac_range[1], macs


def test_mobilefacenet_embedding_size_adds_only_the_last_linear_and_bn():
    params, macs = count_params_macs(build_backbone("mobilefacenet", 128))
    params512, macs512 = count_params_macs(build_backbone("mobilefacenet", 512))
    assert params512 - params == (512 - 128) * (512 + 2)  # the 512→D Linear and the BN1d (weight, bias)
    assert macs512 - macs == 512 * (512 - 128)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is the contract (dynamo=False)
@pytest.mark.parametrize("arch", ["mobilefacenet", "efficientnet_b0"])
def test_onnx_export_with_dynamic_batch_matches_torch(arch):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_backbone(arch, 64).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(2, 3, 112, 112), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 112, 112)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 64)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))

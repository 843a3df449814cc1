"""Function-preserving widening (recipes/mobilefacenet_distill/widen.py): a wider MobileFaceNet started from a narrower one computes
the same embeddings, its copied units are free to diverge, and anything but a pure widening is refused."""
from __future__ import annotations

import pytest
import torch

from train.backbones import build_backbone
from recipes.mobilefacenet_distill.widen import widen_state_dict


def _pair(narrow_width: float = 0.25, wide_width: float = 0.5, **kw):
    torch.manual_seed(0)
    narrow = build_backbone("mobilefacenet", 64, width=narrow_width, stem_stride=4, **kw)
    wide = build_backbone("mobilefacenet", 64, width=wide_width, stem_stride=4, **kw)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so eval mode is a real check
        for m in narrow.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return narrow, wide


@pytest.mark.parametrize("training", [False, True])
def test_widened_network_computes_the_same_embeddings(training):
    narrow, wide = _pair()
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), wide.state_dict(), noise=0.0))
    narrow.train(training)
    wide.train(training)
    x = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_noise_breaks_the_symmetry_of_copies_but_keeps_the_function_close():
    narrow, wide = _pair()
    exact = widen_state_dict(narrow.state_dict(), wide.state_dict(), noise=0.0)
    noisy = widen_state_dict(narrow.state_dict(), wide.state_dict(), noise=0.01)
    key = "body.2.expand.conv.weight"  # first bottleneck's expansion: 16 → 32 inputs, 32 → 64 outputs
    c_old = narrow.state_dict()[key].shape[0]
    assert torch.equal(exact[key][:c_old], noisy[key][:c_old])  # the old units are untouched
    assert not torch.equal(exact[key][c_old:], noisy[key][c_old:])  # the copies moved
    wide.load_state_dict(noisy)
    narrow.eval()
    wide.eval()
    x = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(narrow(x), wide(x))
    assert cos.min() > 0.95 and not torch.allclose(narrow(x), wide(x))


def test_refuses_what_is_not_a_widening():
    narrow, wide = _pair()
    with pytest.raises(ValueError, match="does not fit inside"):
        widen_state_dict(wide.state_dict(), narrow.state_dict())  # narrowing
    other = build_backbone("mobilefacenet", 64, width=0.5, stem_stride=2)  # 7×7 global conv instead of 4×4
    with pytest.raises(ValueError, match="only channels may grow"):
        widen_state_dict(narrow.state_dict(), other.state_dict())
    with pytest.raises(ValueError, match="not the same network"):
        widen_state_dict(narrow.state_dict(), build_backbone("iresnet18", 64).state_dict())

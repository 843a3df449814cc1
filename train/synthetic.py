"""Generated identity images for tests and smoke runs when no face data is at hand.

Each identity is a smooth random colour pattern with a few blobs (its "face"); each sample of it is that
pattern under a small random similarity transform, brightness/contrast change and pixel noise, so identity
is learnable but not trivially so. Everything is a pure function of (seed, identity, sample): the same call
gives the same pixels in any process.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = 112


def identity_pattern(identity: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """The clean uint8 BGR ``size``×``size`` pattern of one identity."""
    rng = np.random.default_rng([seed, identity, 0x1D])
    low = rng.uniform(40, 215, size=(5, 5, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(4):  # a few identity-specific blobs
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        ax, ay = rng.uniform(0.05, 0.16, 2) * size
        colour = rng.uniform(0, 255, 3).tolist()
        cv2.ellipse(img, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    img = cv2.GaussianBlur(img, (0, 0), 2.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def identity_sample(identity: int, sample: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """One uint8 BGR sample of ``identity``: the pattern jittered geometrically and photometrically."""
    base = identity_pattern(identity, seed, size).astype(np.float32)
    rng = np.random.default_rng([seed, identity, sample, 0x5A])
    angle = rng.uniform(-10, 10)
    scale = rng.uniform(0.93, 1.07)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += rng.uniform(-4, 4, 2)
    img = cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT)
    img = img * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_dataset(root: str | Path, identities: int, per_identity: int, seed: int = 0,
                            layout: str = "folder", size: int = SIZE) -> Path:
    """Write generated JPEGs under ``root``.

    ``layout="folder"``: ``root/id_XXXX/YYY.jpg``; ``layout="list"``: flat ``root/XXXX_YYY.jpg`` plus
    ``root/identity.txt`` with ``file identity`` lines (the CelebA list format). Returns ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for ident in range(identities):
        for s in range(per_identity):
            img = identity_sample(ident, s, seed, size)
            if layout == "folder":
                p = root / f"id_{ident:04d}" / f"{s:03d}.jpg"
                p.parent.mkdir(exist_ok=True)
            elif layout == "list":
                p = root / f"{ident:04d}_{s:03d}.jpg"
                lines.append(f"{p.name} {ident + 1000}")
            else:
                raise ValueError(f"layout must be 'folder' or 'list', got {layout!r}")
            cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if layout == "list":
        (root / "identity.txt").write_text("\n".join(lines) + "\n")
    return root

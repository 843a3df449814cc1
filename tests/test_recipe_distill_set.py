"""recipes/mobilefacenet_distill/distill_set.py: joining make_aligned manifests with teacher embeddings, and centring the teacher."""
from __future__ import annotations

import csv

import numpy as np

from recipes.mobilefacenet_distill.distill_set import center_teacher, main, same_face


def _write_part(root, rng):
    (root / "crops").mkdir()
    rows = [("a.jpg", "7", "ok", "7/a.png", "10 10 50 50"),
            ("b.jpg", "7", "ok", "7/b.png", "10 10 50 50"),
            ("c.jpg", "8", "ok", "8/c.png", "100 100 140 140"),  # the teacher embedded another face
            ("d.jpg", "8", "failed", "", "")]
    with open(root / "crops" / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "identity", "status", "reason", "output", "faces", "score", "box"])
        for src, ident, status, out, box in rows:
            w.writerow([src, ident, status, "", out, 1, 0.9, box])
    emb = rng.normal(size=(4, 16)).astype(np.float32) + 5.0  # a large common component, like dlib's
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(root / "teacher.npz", paths=np.array(["src/a.jpg", "src/b.jpg", "src/c.jpg", "src/d.jpg"]),
             emb=emb, emb_flip=emb, box=np.array([[12, 12, 48, 48]] * 4, np.float32), found=np.ones(4, bool))


def test_join_keeps_every_crop_and_only_matching_teacher_vectors(tmp_path):
    _write_part(tmp_path, np.random.default_rng(0))
    assert main(["--root", str(tmp_path), "--out", str(tmp_path / "set"), "--part", "crops:teacher.npz:src"]) == 0
    lines = (tmp_path / "set.txt").read_text().split()
    assert lines == ["crops/7/a.png", "7", "crops/7/b.png", "7", "crops/8/c.png", "8"]  # failed rows dropped
    t = np.load(tmp_path / "set_teacher.npz")
    assert list(t["paths"]) == ["crops/7/a.png", "crops/7/b.png", "crops/8/c.png"]
    norms = np.linalg.norm(t["emb"], axis=1)
    assert np.allclose(norms[:2], 1.0, atol=1e-5) and norms[2] == 0.0  # c: teacher saw a different face


def test_centring_removes_the_common_direction():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(200, 32)) + 4.0
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    raw[5] = 0.0  # no teacher vector: stays zero
    emb, flip, center = center_teacher(raw.astype(np.float32), raw.astype(np.float32))
    off_diag = (raw @ raw.T)[~np.eye(200, dtype=bool)]
    assert off_diag[off_diag != 0].mean() > 0.8  # raw vectors all look alike
    cos = (emb @ emb.T)[~np.eye(200, dtype=bool)]
    assert abs(cos[cos != 0].mean()) < 0.05 and np.all(emb[5] == 0)
    assert np.allclose(np.linalg.norm(np.delete(emb, 5, 0), axis=1), 1.0, atol=1e-5)
    assert np.allclose(center, np.delete(raw, 5, 0).mean(0), atol=1e-6)


def test_same_face_uses_box_centres():
    box = np.array([0, 0, 100, 100], np.float32)
    assert same_face(box, np.array([10, 10, 90, 90], np.float32))
    assert not same_face(box, np.array([80, 80, 180, 180], np.float32))
    assert not same_face(box, np.full(4, np.nan, np.float32))

"""recipes/mobilefacenet_distill/teacher_morphs.py: morph planning, blending and joining the morphs to the distillation set
(the dlib part of the generator is a training-time tool, not installed in CI)."""
from __future__ import annotations

import numpy as np
import pytest

from train.datasets import UNLABELLED, list_source
from recipes.mobilefacenet_distill.teacher_morphs import blend, main, plan_morphs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_plan_pairs_different_people_mostly_look_alikes():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(40, 16)))
    ids = np.repeat(np.arange(40), 3)
    teacher = _unit(centres[ids] + 0.1 * rng.normal(size=(120, 16)))
    pairs, lam = plan_morphs(teacher, ids, views=4, near=1.0, k=6, seed=1)
    assert pairs.shape == (480, 2) and lam.shape == (480,) and (lam >= 0.25).all() and (lam <= 0.75).all()
    assert np.array_equal(pairs[:, 0], np.repeat(np.arange(120), 4))
    assert (ids[pairs[:, 0]] != ids[pairs[:, 1]]).all()
    sim = teacher @ teacher.T
    sim[ids[:, None] == ids[None, :]] = -np.inf
    sixth = np.sort(sim, axis=1)[:, -6]  # each face's 6th most similar other person
    assert (sim[pairs[:, 0], pairs[:, 1]] >= sixth[pairs[:, 0]] - 1e-6).all()
    pairs_random, _ = plan_morphs(teacher, ids, views=4, near=0.0, k=6, seed=1)
    assert (ids[pairs_random[:, 0]] != ids[pairs_random[:, 1]]).all()
    assert (sim[pairs_random[:, 0], pairs_random[:, 1]] < sixth[pairs_random[:, 0]] - 1e-6).mean() > 0.5


def test_blend_is_the_weighted_mean():
    a, b = np.full((2, 2, 3), 200, np.uint8), np.full((2, 2, 3), 10, np.uint8)
    out = blend(a, b, 0.25)
    assert out.dtype == np.uint8 and (out == round(0.25 * 200 + 0.75 * 10)).all()


def test_merge_appends_unlabelled_morphs_centred_like_the_set(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "crops").mkdir()
    real = [f"crops/{i}.png" for i in range(4)]
    morphs = [f"morphs/shard0/{i:06d}.png" for i in range(3)]
    for p in real + morphs:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"x")
    (tmp_path / "set.txt").write_text("".join(f"{p} {7 + i // 2}\n" for i, p in enumerate(real)))
    center = rng.normal(size=16).astype(np.float32)
    emb = _unit(rng.normal(size=(4, 16)))
    np.savez(tmp_path / "set_teacher.npz", paths=np.array(real), emb=emb, emb_flip=emb, center=center)
    raw = _unit(rng.normal(size=(3, 16)) + 3.0)
    np.savez(tmp_path / "morphs" / "shard0.npz", paths=np.array(morphs), emb=raw,
             parents=np.array([real[:2]] * 3), lam=np.full(3, 0.5, np.float32))
    assert main(["--merge", "--distill", str(tmp_path / "set"), "--out", str(tmp_path / "morphs"),
                 "--merged", str(tmp_path / "all")]) == 0
    src = list_source(tmp_path / "all.txt", tmp_path)
    assert src.keys == real + morphs and src.labels.tolist() == [0, 0, 1, 1, -1, -1, -1]
    assert UNLABELLED in (tmp_path / "all.txt").read_text()
    t = np.load(tmp_path / "all_teacher.npz")
    assert list(t["paths"]) == real + morphs and np.array_equal(t["emb"][:4], emb)
    np.testing.assert_allclose(t["emb"][4:], _unit(raw - center), atol=1e-6)  # the set's centring, re-normalised
    np.testing.assert_array_equal(t["emb_flip"][4:], t["emb"][4:])


def _morph_set(tmp_path, rng):
    """A 4-crop distillation set under ``tmp_path`` (stem ``set``); returns its crop paths."""
    real = [f"crops/{i}.png" for i in range(4)]
    (tmp_path / "set.txt").write_text("".join(f"{p} {i // 2}\n" for i, p in enumerate(real)))
    emb = _unit(rng.normal(size=(4, 16)))
    center = rng.normal(size=16).astype(np.float32)
    np.savez(tmp_path / "set_teacher.npz", paths=np.array(real), emb=emb, emb_flip=emb, center=center)
    return real


def _shard(path, names, parents, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, paths=np.array(names), emb=_unit(rng.normal(size=(len(names), 16))),
             parents=np.array([parents] * len(names)), lam=np.full(len(names), 0.5, np.float32))


def test_merge_joins_several_morph_folders_in_order(tmp_path):
    rng = np.random.default_rng(3)
    real = _morph_set(tmp_path, rng)
    _shard(tmp_path / "m1" / "shard0.npz", ["m1/shard0/000000.png"], real[:2], rng)
    _shard(tmp_path / "m1" / "shard1.npz", ["m1/shard1/000001.png"], real[1:3], rng)
    _shard(tmp_path / "m2" / "shard0.npz", ["m2/shard0/000000.png", "m2/shard0/000002.png"], real[2:], rng)
    assert main(["--merge", "--distill", str(tmp_path / "set"), "--out", str(tmp_path / "m1"),
                 "--out", str(tmp_path / "m2"), "--merged", str(tmp_path / "all")]) == 0
    t = np.load(tmp_path / "all_teacher.npz")
    assert list(t["paths"]) == real + ["m1/shard0/000000.png", "m1/shard1/000001.png",
                                       "m2/shard0/000000.png", "m2/shard0/000002.png"]


def test_merge_refuses_shards_of_another_set_or_given_twice(tmp_path):
    rng = np.random.default_rng(4)
    real = _morph_set(tmp_path, rng)
    _shard(tmp_path / "m" / "shard0.npz", ["m/shard0/000000.png"], [real[0], "crops/elsewhere.png"], rng)
    with pytest.raises(SystemExit, match="planned on another distillation set"):
        main(["--merge", "--distill", str(tmp_path / "set"), "--out", str(tmp_path / "m"),
              "--merged", str(tmp_path / "all")])
    _shard(tmp_path / "m" / "shard0.npz", ["m/shard0/000000.png"], real[:2], rng)  # now a valid shard
    with pytest.raises(SystemExit, match="give each --out folder once"):
        main(["--merge", "--distill", str(tmp_path / "set"), "--out", str(tmp_path / "m"),
              "--out", str(tmp_path / "m"), "--merged", str(tmp_path / "all")])
    assert not (tmp_path / "all.txt").exists()

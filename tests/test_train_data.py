"""Training data: RecordIO, list/folder datasets, samplers, augmentation, train/deploy preprocessing parity."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from runtime.preprocess import RECOGNIZER_SPEC, to_model_input
from train.augment import PRESETS, build_augmenter
from train.config import load_config
from train.datasets import (UNLABELLED, DataError, FaceDataset, SyntheticSource, filter_identities, folder_source, list_source,
                            source_from_config)
from evaluation.verification import quick_verify
from train.evaluate import load_eval_set
from train.recordio import MAGIC, RecordIOReader, write_image_dataset
from train.samplers import PKBatchSampler, ShuffleBatchSampler
from train.synthetic import identity_sample, write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ RecordIO
def _spec_record(payload: bytes) -> bytes:
    """One record written straight from the dmlc spec (independent of train.recordio's writer)."""
    magic = struct.pack("<I", MAGIC)
    out, start, n = b"", 0, len(payload)
    for i in range(0, n - n % 4, 4):
        if payload[i:i + 4] == magic:
            out += magic + struct.pack("<I", ((1 if start == 0 else 2) << 29) | (i - start)) + payload[start:i]
            start = i + 4
    out += magic + struct.pack("<I", ((3 if start else 0) << 29) | (n - start)) + payload[start:]
    return out + b"\0" * (-n % 4)


def _ir(flag: int, label, id1: int, payload: bytes) -> bytes:
    if flag:
        return struct.pack("<IfQQ", flag, 0.0, id1, 0) + np.asarray(label, "<f4").tobytes() + payload
    return struct.pack("<IfQQ", 0, float(label), id1, 0) + payload


def test_recordio_reader_on_spec_written_file(tmp_path):
    imgs = [cv2.imencode(".jpg", identity_sample(i // 2, i % 2))[1].tobytes() for i in range(4)]
    # a payload that contains the magic word at an aligned offset: must be split and re-joined
    tricky = b"abcd" + struct.pack("<I", MAGIC) + b"xyz!" + struct.pack("<I", MAGIC) + b"end"
    records = [(0, _ir(2, [5, 7], 0, b""))]  # header: images 1..4, identity records 5..6
    records += [(k, _ir(0, (k - 1) // 2, k, imgs[k - 1])) for k in range(1, 5)]
    records += [(5, _ir(2, [1, 3], 0, b"")), (6, _ir(2, [3, 5], 0, b"")), (7, _ir(0, 9, 7, tricky))]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    lines = []
    with open(rec, "wb") as f:
        for key, payload in records:
            lines.append(f"{key}\t{f.tell()}")
            f.write(_spec_record(payload))
    idx.write_text("\n".join(lines) + "\n")

    r = RecordIOReader(rec)
    header, body = r.read_image(3)
    assert header.flag == 0 and header.label == 1.0 and header.id == 3 and body == imgs[2]
    h7, body7 = r.read_image(7)
    assert body7 == tricky and h7.label == 9.0
    keys, labels = r.image_keys_and_labels()
    assert keys.tolist() == [1, 2, 3, 4] and labels.tolist() == [0, 0, 1, 1]
    src = source_from_config({**load_config(None, ["data.format=rec", f"data.rec={rec}"])["data"]})
    assert len(src) == 4 and src.num_classes == 2
    assert np.array_equal(src.read(2), cv2.imdecode(np.frombuffer(imgs[2], np.uint8), cv2.IMREAD_COLOR))
    # our writer produces the same bytes as the spec-written file for the same records
    write_image_dataset(tmp_path / "w.rec", tmp_path / "w.idx", [imgs[:2], imgs[2:]])
    w = RecordIOReader(tmp_path / "w.rec")
    assert [w.read_image(k)[1] for k in range(1, 5)] == imgs
    assert w.image_keys_and_labels()[1].tolist() == [0, 0, 1, 1]


def test_recordio_reports_corruption(tmp_path):
    rec = tmp_path / "bad.rec"
    rec.write_bytes(b"\0" * 16)
    (tmp_path / "bad.idx").write_text("0\t0\n")
    with pytest.raises(ValueError, match="bad magic"):
        RecordIOReader(rec).read(0)


# ------------------------------------------------------------------------------------------------ sources
def test_folder_and_list_sources(tmp_path):
    write_synthetic_dataset(tmp_path / "tree", identities=3, per_identity=4, layout="folder")
    src = folder_source(tmp_path / "tree")
    assert len(src) == 12 and src.num_classes == 3 and src.keys[0] == "id_0000/000.jpg"
    assert np.bincount(src.labels).tolist() == [4, 4, 4]
    assert src.read(5).shape == (112, 112, 3)

    root = write_synthetic_dataset(tmp_path / "flat", identities=3, per_identity=3, layout="list")
    (root / "0001_000.jpg").unlink()  # a missing file is skipped with a warning
    with pytest.warns(UserWarning, match="missing"):
        lst = list_source(root / "identity.txt")
    assert len(lst) == 8 and lst.class_names == ["1000", "1001", "1002"]
    assert lst.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    small = filter_identities(lst, min_per_identity=3)
    assert small.class_names == ["1000", "1002"] and small.labels.tolist() == [0, 0, 0, 1, 1, 1]

    (tmp_path / "bad.txt").write_text("only_one_field\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        list_source(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="none of the"):
        list_source(root / "identity.txt", root=tmp_path)


def test_unlabelled_samples_have_no_class_and_survive_subsets(tmp_path):
    root = write_synthetic_dataset(tmp_path / "flat", identities=3, per_identity=2, layout="list")
    lines = (root / "identity.txt").read_text().splitlines()
    names = [ln.split()[0] for ln in lines]
    (root / "mixed.txt").write_text("\n".join(lines[:4] + [f"{names[4]} {UNLABELLED}", lines[5], f"{names[0]} {UNLABELLED}"]))
    src = list_source(root / "mixed.txt")
    assert src.class_names == ["1000", "1001", "1002"] and src.labels.tolist() == [0, 0, 1, 1, -1, 2, -1]
    kept = filter_identities(src, min_per_identity=2)  # 1002 has one labelled image: dropped; −1 rows stay
    assert kept.class_names == ["1000", "1001"] and kept.labels.tolist() == [0, 0, 1, 1, -1, -1]
    s = PKBatchSampler(kept.labels, p=2, k=2, seed=0)
    assert all(kept.labels[i] >= 0 for b in s for i, _ in b)  # P×K batches hold identities only


def test_celeba_list_file(facekit_data):
    lst = facekit_data / "celeba" / "identity_aligned.txt"
    if not lst.is_file():
        pytest.skip("celeba/identity_aligned.txt absent")
    src = filter_identities(list_source(lst, facekit_data / "celeba" / "aligned_89x109"), 2, max_identities=5)
    assert src.num_classes == 5 and (np.bincount(src.labels) >= 2).all()
    with pytest.warns(UserWarning, match="resized"):
        ds = FaceDataset(src, "none", cache="none")
    assert ds.crop(0).shape == (112, 112, 3)


# ------------------------------------------------------------------------------------------------ samplers
def test_pk_sampler_batches_and_resume():
    labels = np.repeat(np.arange(12), [1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 9])
    s = PKBatchSampler(labels, p=4, k=3, seed=1)
    batches = list(s)
    assert len(batches) == 4  # 19 chunks of K=3 → 4 batches of P=4 identities
    for b in batches:
        idx = [i for i, _ in b]
        ids, counts = np.unique(labels[idx], return_counts=True)
        assert len(b) == 12 and len(ids) == 4 and (counts == 3).all()
    # every image is visited in an epoch (identities with ≥ K images)
    seen = {i for b in batches for i, _ in b}
    assert len(seen) > 0.6 * len(labels)
    # resume from batch 2 gives exactly the rest of the epoch; another epoch is a different order
    t = PKBatchSampler(labels, p=4, k=3, seed=1)
    t.load_state_dict(s.state_dict(samples_consumed=2 * s.global_batch))
    assert list(t) == batches[2:]
    s.set_epoch(1)
    assert list(s) != batches
    # DDP: ranks take disjoint global batches
    r0, r1 = (list(PKBatchSampler(labels, 4, 3, seed=1, rank=r, world_size=2)) for r in (0, 1))
    assert r0 == batches[0::2][:len(r0)] and r1 == batches[1::2][:len(r1)] and len(r0) == len(r1)


def test_shuffle_sampler_covers_epoch_and_resumes():
    s = ShuffleBatchSampler(50, 8, seed=3)
    batches = list(s)
    flat = [i for b in batches for i, _ in b]
    assert len(batches) == 6 and len(set(flat)) == 48
    t = ShuffleBatchSampler(50, 8, seed=3)
    t.load_state_dict(s.state_dict(4 * 8))
    assert list(t) == batches[4:]
    with pytest.raises(ValueError, match="cannot fill"):
        ShuffleBatchSampler(5, 8)


# ------------------------------------------------------------------------------------------------ augment
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_augment_presets_keep_shape_and_dtype(preset):
    aug = build_augmenter(preset)
    img = identity_sample(3, 1)
    for seed in range(12):
        out, flipped = aug(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8 and isinstance(flipped, bool)
    a, _ = aug(img, np.random.default_rng(7))
    b, _ = aug(img, np.random.default_rng(7))
    assert np.array_equal(a, b)  # a pure function of the seed
    if preset != "none":
        assert any(not np.array_equal(aug(img, np.random.default_rng(s))[0], img) for s in range(12))
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augmenter("sparkles")


# ------------------------------------------------------------------------------------------------ dataset
def test_dataset_tensor_equals_runtime_preprocessing():
    """Train/deploy no-drift: the tensor a sample becomes is exactly the runtime's to_model_input of the crop."""
    src = SyntheticSource(identities=3, per_identity=2)
    for cache in ("decoded", "none"):
        ds = FaceDataset(src, "colour", cache=cache, progress=False)
        crop = src.read(4)  # BGR, as OpenCV decodes
        item = ds[4]
        assert item["label"] == 2
        assert np.array_equal(item["image"], to_model_input(crop, RECOGNIZER_SPEC, color_order="BGR")[0])
        assert np.array_equal(item["image"], to_model_input(crop[..., ::-1].copy(), RECOGNIZER_SPEC, color_order="RGB")[0])
    # an augmented item is to_model_input of the augmented crop
    aug_crop, _ = ds.augment(ds.crop(1), np.random.default_rng(99))
    assert np.array_equal(ds[(1, 99)]["image"], to_model_input(aug_crop, RECOGNIZER_SPEC, color_order="BGR")[0])


def test_dataset_resizes_other_sizes_with_a_warning(tmp_path):
    root = tmp_path / "t"
    for i in range(2):
        (root / f"p{i}").mkdir(parents=True)
        cv2.imwrite(str(root / f"p{i}" / "a.png"), np.full((109, 89, 3), 50 * i, np.uint8))
    with pytest.warns(UserWarning, match="89×109"):
        ds = FaceDataset(folder_source(root), "flip", cache="decoded", progress=False)
    assert ds[1]["image"].shape == (3, 112, 112)


def test_teacher_vectors_follow_the_flip(tmp_path):
    src = SyntheticSource(identities=2, per_identity=3)
    emb = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    order = np.arange(6)[::-1]  # the npz may list samples in any order
    np.savez(tmp_path / "t.npz", paths=np.array(src.keys)[order], emb=emb[order], emb_flip=-emb[order])
    ds = FaceDataset(src, "flip", cache="none", teacher=tmp_path / "t.npz")
    flips = []
    for seed in range(10):
        item = ds[(2, seed)]
        flipped = not np.array_equal(item["image"], ds[2]["image"])
        flips.append(flipped)
        assert np.array_equal(item["teacher"], -emb[2] if flipped else emb[2])
    assert any(flips) and not all(flips)
    np.savez(tmp_path / "short.npz", paths=np.array(src.keys[:3]), emb=emb[:3], emb_flip=emb[:3])
    with pytest.raises(DataError, match="no teacher embedding for 3"):
        FaceDataset(src, "flip", teacher=tmp_path / "short.npz")


def test_loader_workers_give_the_same_batches():
    src = SyntheticSource(identities=4, per_identity=4)
    ds = FaceDataset(src, "strong", cache="decoded", progress=False)

    def first_batch(workers):
        s = ShuffleBatchSampler(len(ds), 8, seed=5)
        kw = dict(num_workers=workers, multiprocessing_context="fork") if workers else {}
        return next(iter(torch.utils.data.DataLoader(ds, batch_sampler=s, **kw)))

    a, b = first_batch(0), first_batch(2)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


# ------------------------------------------------------------------------------------------------ eval, config
def test_bin_pairs_and_restricted_unpickler(tmp_path, facekit_data):
    path = facekit_data / "photos" / "small_lfw.bin"
    if not path.is_file():
        pytest.skip("photos/small_lfw.bin absent")
    ps, crops = load_eval_set("bin", path)
    assert crops.shape == (20, 112, 112, 3) and len(ps.issame) == 10
    r = quick_verify(lambda c: c.reshape(len(c), -1)[:, ::97].astype(np.float32), crops, ps.pairs, ps.issame)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["pairs"] == 10

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"x", b"y"], [Evil()])))
    with pytest.raises(DataError, match="builtins.print"):
        load_eval_set("bin", tmp_path / "evil.bin")


def test_config_overrides_and_the_name_from_the_file(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "data.augment=[flip, cutout]", "loss.triplet={weight: 0.5}",
                             "data.sampler=pk", "data.pk_p=4", "data.pk_k=4", "data.batch_size=16",
                             "data.format=synthetic"])
    assert cfg["optim"]["lr"] == 0.01 and cfg["data"]["augment"] == ["flip", "cutout"]
    y = tmp_path / "exp.yaml"
    y.write_text("data: {format: synthetic}\nschedule: {steps: 7}\n")
    c = load_config(y)
    assert c["name"] == "exp" and c["schedule"]["steps"] == 7


def test_shipped_recognition_configs_validate():
    import yaml

    from train.backbones import BACKBONES

    files = sorted((ROOT / "train" / "configs").glob("*.yaml")) + sorted((ROOT / "recipes").glob("*/configs/*.yaml"))
    checked = 0
    for f in files:
        if (yaml.safe_load(f.read_text()) or {}).get("task", "recognition") != "recognition":
            continue  # e.g. the aligner's config
        cfg = load_config(f)
        assert cfg["arch"] in BACKBONES and cfg["name"] == f.stem
        checked += 1
    assert checked >= 6


def test_teacher_rows_found_through_make_aligned_manifest(tmp_path):
    root = write_synthetic_dataset(tmp_path / "crops", identities=2, per_identity=2, layout="folder")
    src = folder_source(root)
    sources = {k: f"photos/{k.replace('/', '_')}.jpg" for k in src.keys}  # what make_aligned.py read
    (root / "manifest.csv").write_text("source,identity,status,reason,output\n" + "".join(
        f"{v},x,ok,,{k}\n" for k, v in sources.items()))
    emb = np.eye(4, dtype=np.float32)
    np.savez(tmp_path / "t.npz", paths=np.array([f"wild/{sources[k]}" for k in src.keys]), emb=emb, emb_flip=emb)
    ds = FaceDataset(src, "none", teacher=tmp_path / "t.npz")
    assert np.array_equal(ds.teacher_emb, emb)

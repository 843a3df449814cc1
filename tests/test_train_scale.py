"""The single-process parts of training at scale: device-side normalisation, the sharded head's maths and class
sampling, world-size-safe sampler positions, the numpy RecordIO index, cache sizing per machine, skipped
non-finite steps, several evaluation sets, fp32 embedding layers, DDP's registered-parameter check."""
from __future__ import annotations

import copy
import csv
import os
import pickle

import cv2
import numpy as np
import pytest
import torch

from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec, to_model_input
from train import crop_cache
from train.config import ConfigError, load_config
from train.datasets import DataError, FaceDataset, RecordSource, SyntheticSource, source_from_config
from train.device_input import DeviceNormalizer
from train.losses import build_loss
from train.optim import build_optimizer, step_unless
from train.recordio import IRHeader, RecordIOReader, pack_record, write_image_dataset, write_recordio
from train.samplers import PKBatchSampler, ShuffleBatchSampler
from train.schedule import BatchLayout, RunPosition, describe_layout_change, legacy_position
from train.sharded_head import init_class_rows, shard_range, sharded_builder
from train.synthetic import identity_sample
from train.trainer import Trainer

BASE = ["arch=mobilefacenet", "backbone_kwargs={width: 0.25, stem_stride: 4}", "embedding_size=32", "train.device=cpu",
        "train.threads=1", "train.progress=false", "train.tensorboard=false", "data.workers=0", "data.format=synthetic",
        "loss.s=16.0", "loss.m=0.2", "train.checkpoint_every=0"]


# ------------------------------------------------------------------------------------------ uint8 transfer
@pytest.mark.parametrize("spec", [RECOGNIZER_SPEC, PreprocessSpec(color_order="BGR", mean=(1.0, 2.0, 3.0), std=(50.0, 60.0, 70.0)),
                                  PreprocessSpec(layout="NHWC")], ids=["default", "bgr-mean-std", "nhwc"])
def test_device_normalisation_equals_to_model_input(spec):
    """The loader's uint8 batch normalised on the device is bit-identical to runtime.preprocess.to_model_input of
    the same augmented crops (colour order, mean, std and layout taken from the spec)."""
    ds = FaceDataset(SyntheticSource(identities=3, per_identity=3), "colour", cache="decoded", progress=False,
                     output="uint8")
    sampler = ShuffleBatchSampler(len(ds), 4, seed=2)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 112, 112, 3)
    crops = np.stack([ds.augment(ds.crop(i), np.random.default_rng(s))[0] for i, s in next(iter(sampler))])
    expected = to_model_input(crops, spec, color_order="BGR")
    for channels_last in (False, True):
        got = DeviceNormalizer(spec, "BGR", "cpu", channels_last)(batch["image"])
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected)
    float_ds = FaceDataset(ds.source, "colour", cache="none", progress=False)
    assert np.array_equal(float_ds[(0, 5)]["image"], DeviceNormalizer()(torch.from_numpy(ds[(0, 5)]["image"][None]))[0].numpy())


# ------------------------------------------------------------------------------------------ sharded head maths
def test_sharded_head_in_one_process_is_the_full_head_and_sampling_keeps_every_present_class():
    section = {"head": "combined", "s": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.1, "label_smoothing": 0.1, "focal_gamma": 1.0}
    full = build_loss({"loss": section}, 50, 8)
    sharded = build_loss({"loss": section}, 50, 8, classification=sharded_builder(0, 1, seed=3))
    assert torch.equal(sharded.parts["combined"].head.weight, init_class_rows(0, 50, 8, seed=3))
    full.load_state_dict(sharded.state_dict())  # the same key names: checkpoints move between the two
    emb, labels = torch.randn(10, 8, requires_grad=True), torch.tensor([0, 3, -1, 49, 3, 7, 8, 9, 10, 11])
    (a, _), (b, _) = full(emb, labels), sharded(emb, labels)
    ga, gb = torch.autograd.grad(a, emb)[0], torch.autograd.grad(b, emb)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    # class sampling: 30 % of 50 classes, but room for the 9 present ones; only sampled rows get gradient
    section["sample_rate"] = 0.3
    sampled = build_loss({"loss": section}, 50, 8, classification=sharded_builder(0, 1, seed=3)).parts["combined"]
    value = sampled(emb, labels, sample_seed=11)
    value.backward()
    touched = set(torch.nonzero(sampled.head.weight.grad.abs().sum(1))[:, 0].tolist())
    assert len(touched) == 15 and {0, 3, 49, 7, 8, 9, 10, 11} <= touched
    again = build_loss({"loss": section}, 50, 8, classification=sharded_builder(0, 1, seed=3)).parts["combined"]
    assert torch.equal(again(emb, labels, sample_seed=11), value)  # a pure function of (seed, step)
    assert shard_range(11, 0, 2) == (0, 6) and shard_range(11, 1, 2) == (6, 11)
    # the shards' initial rows do not depend on the number of ranks
    assert torch.equal(torch.cat([init_class_rows(*shard_range(9000, r, 3), 4, 1) for r in range(3)]),
                       init_class_rows(0, 9000, 4, 1))


# ------------------------------------------------------------------------------------------ sampler positions
def test_sampler_positions_do_not_depend_on_the_process_layout():
    """2 ranks × 1 micro-batch and 1 process × 2 accumulated micro-batches cut an epoch into the same blocks;
    a resume at a global sample position continues there whatever the layout."""
    two = [list(ShuffleBatchSampler(50, 4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    one = list(ShuffleBatchSampler(50, 4, seed=1, accumulate=2))
    assert [b for pair in zip(*two) for b in pair] == one and len(one) == 12  # 48 of 50: the tail is dropped
    later = ShuffleBatchSampler(50, 4, seed=1)
    later.load_state_dict(ShuffleBatchSampler(50, 4, seed=1, rank=1, world_size=2).state_dict(samples_consumed=24))
    assert list(later) == one[6:]
    labels = np.repeat(np.arange(10), 4)
    pk_two = [list(PKBatchSampler(labels, 2, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    pk_one = list(PKBatchSampler(labels, 2, 2, seed=3, accumulate=2))
    assert [b for pair in zip(*pk_two) for b in pair] == pk_one


def test_run_position_is_saved_flat_and_names_a_layout_change():
    pos = RunPosition(step=3, epoch=1, sample_in_epoch=24, samples_seen=96, ref_global_batch=8,
                      layout=ShuffleBatchSampler(50, 4, world_size=2, rank=1).layout)
    state = pos.state_dict()
    assert state == {"step": 3, "epoch": 1, "sample_in_epoch": 24, "samples_seen": 96, "ref_global_batch": 8,
                     "world_size": 2, "batch_size": 4, "accumulate": 1}  # the checkpoint's "position" entry
    assert RunPosition.from_state(state) == pos and pos.layout.global_batch == 8
    assert describe_layout_change(pos, BatchLayout(2, 4)) is None
    note = describe_layout_change(pos, BatchLayout(1, 2, 4))
    assert note.startswith("resuming a run saved with 2 process(es) × batch 4 (global 8) on 1 process(es) × batch 2 "
                           "× 4 accumulated (global 8): it continues at global sample 24 of epoch 1"), note
    old = legacy_position({"step": 5, "sampler": {"epoch": 2, "start_batch": 3}}, batch_size=4, world_size=2)
    assert (old.sample_in_epoch, old.samples_seen, old.ref_global_batch, old.layout) == (24, 40, 8, BatchLayout(2, 4))


# ------------------------------------------------------------------------------------------ RecordIO index
def _rec(tmp_path, identities=3, per=2):
    imgs = [[cv2.imencode(".jpg", identity_sample(i, s))[1].tobytes() for s in range(per)] for i in range(identities)]
    write_image_dataset(tmp_path / "train.rec", tmp_path / "train.idx", imgs)
    return tmp_path / "train.rec"


def test_recordio_index_is_numpy_and_parsed_once(tmp_path):
    rec = _rec(tmp_path)
    first = RecordIOReader(rec)
    assert isinstance(first.index.offsets, np.ndarray) and first.index.sequential
    sidecars = sorted(p.name for p in tmp_path.glob(".train.idx.*"))
    assert len(sidecars) == 1 and "index" in sidecars[0]
    src = RecordSource(rec)
    assert src.labels.tolist() == [0, 0, 1, 1, 2, 2] and src.class_names == ["0", "1", "2"]
    assert src.keys[1] == "2" and len(src.keys) == 6 and src.encoded_bytes() > 6 * 1000
    assert not list(tmp_path.glob(".train.idx.labels.*"))  # identity records give the labels: nothing to cache
    again = RecordIOReader(rec)
    assert isinstance(again.index.offsets, np.memmap) and again.read_image(3)[1] == first.read_image(3)[1]
    # an index with keys out of order (and without header records) still works; duplicates are refused
    write_recordio(tmp_path / "odd.rec", tmp_path / "odd.idx", [(5, b"five"), (2, b"two")])
    lines = (tmp_path / "odd.idx").read_text().splitlines()
    (tmp_path / "odd.idx").write_text("\n".join(lines[::-1]) + "\n")
    odd = RecordIOReader(tmp_path / "odd.rec")
    assert odd.keys.tolist() == [2, 5] and odd.read(5) == b"five" and not odd.index.sequential
    with pytest.raises(KeyError, match="no record with key 3"):
        odd.read(3)
    (tmp_path / "dup.rec").write_bytes((tmp_path / "odd.rec").read_bytes())
    (tmp_path / "dup.idx").write_text("2\t0\n2\t12\n")
    with pytest.raises(ValueError, match="key 2 appears more than once"):
        RecordIOReader(tmp_path / "dup.rec")


def test_recordio_labels_from_image_headers_are_cached(tmp_path):
    """Without insightface identity records each image header is read once; later opens use the sidecar."""
    records = [(k, pack_record(IRHeader(0, float(k % 3), k, 0), b"img")) for k in (4, 7, 9, 12)]
    write_recordio(tmp_path / "h.rec", tmp_path / "h.idx", records)
    keys, labels = RecordIOReader(tmp_path / "h.rec").image_keys_and_labels()
    assert keys.tolist() == [4, 7, 9, 12] and labels.tolist() == [1, 1, 0, 0]
    assert len(list(tmp_path.glob(".h.idx.labels.*"))) == 1
    again = RecordIOReader(tmp_path / "h.rec").image_keys_and_labels()
    assert isinstance(again[1], np.memmap) and again[1].tolist() == [1, 1, 0, 0]


def test_recordio_index_accepts_any_whitespace_and_names_bad_lines(tmp_path):
    write_recordio(tmp_path / "s.rec", tmp_path / "s.idx", [(0, b"zero"), (1, b"one")])
    lines = (tmp_path / "s.idx").read_text().split()
    (tmp_path / "s.idx").write_text(f"{lines[0]}  {lines[1]}\n{lines[2]} {lines[3]}\n")
    r = RecordIOReader(tmp_path / "s.rec")
    assert r.index.sequential and r.read(1) == b"one"
    for bad in ("0\t0\n1\tx\n", "0\t0\t3\n"):
        (tmp_path / "b.rec").write_bytes(b"")
        (tmp_path / "b.idx").write_text(bad)
        for old in tmp_path.glob(".b.idx.*"):
            old.unlink()
        with pytest.raises(ValueError, match="b.idx: expected 'key offset' lines"):
            RecordIOReader(tmp_path / "b.rec")


def test_recordio_sidecars_go_to_the_cache_when_the_dataset_folder_is_read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _rec(ro)
    monkeypatch.setenv("FACEKIT_CACHE", str(tmp_path / "cache"))
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write into read-only folders")
        RecordSource(ro / "train.rec")
        assert len(list((tmp_path / "cache" / "recordio").glob("*.facekit.npy"))) == 1  # the index
    finally:
        os.chmod(ro, 0o755)


def test_cache_sizing_counts_the_processes_of_the_machine(tmp_path):
    """A decoded cache that fits one process but not 10⁶ of them is refused naming both; ``auto`` falls back
    (here to ``none``) with a warning; RecordIO data defaults to no cache."""
    src = SyntheticSource(identities=2, per_identity=2)
    per = 4 * 112 * 112 * 3
    ds = FaceDataset(src, "none", cache="auto", progress=False)
    assert ds.cache_mode == "decoded"
    many = int(crop_cache.available_memory() / per) + 1
    with pytest.raises(DataError, match=rf"needs .* × {many} processes on this machine"):
        FaceDataset(src, "none", cache="decoded", progress=False, processes=many)
    with pytest.raises(DataError, match="data.cache=encoded needs"):
        FaceDataset(src, "none", cache="encoded", progress=False, processes=many * 1000)
    with pytest.warns(UserWarning, match="data.cache=auto: no cache"):
        assert FaceDataset(src, "none", cache="auto", progress=False, processes=many * 1000).cache_mode == "none"
    enc = FaceDataset(src, "none", cache="encoded", progress=False)
    assert np.array_equal(enc.crop(3), ds.crop(3))
    rec_cfg = load_config(None, ["data.format=rec", f"data.rec={_rec(tmp_path)}"])["data"]
    assert rec_cfg["cache"] == "auto"
    rec_ds = FaceDataset(source_from_config(rec_cfg), "none", cache=rec_cfg["cache"], data_format="rec", progress=False)
    assert rec_ds.cache_mode == "none"


# ------------------------------------------------------------------------------------------ non-finite steps
def test_nonfinite_steps_are_skipped_on_the_device_and_stop_the_run(tmp_path):
    """A NaN weight makes every loss non-finite: the updates are skipped (all other weights and the momentum stay
    bit-identical), the log rows count them, and 20 in a row stop the run at the next log row."""
    snaps = {}

    def poison(trainer):
        if trainer.step == 2:
            with torch.no_grad():
                trainer.backbone.fc.weight[0, 0] = float("nan")
            snaps["w"] = copy.deepcopy(trainer.backbone.state_dict())
            snaps["m"] = {id(p): s["momentum_buffer"].clone() for p, s in trainer.optimizer.state.items()}

    cfg = load_config(None, [*BASE, f"output={tmp_path / 'run'}", "data.synthetic={identities: 4, per_identity: 4, seed: 0}",
                             "data.batch_size=4", "schedule.steps=40", "train.log_every=5"])
    trainer = Trainer(cfg, callbacks=[poison])
    with pytest.warns(UserWarning, match="non-finite loss or gradient; their updates were skipped"):
        with pytest.raises(FloatingPointError, match="non-finite losses in a row at step 25"):
            trainer.train()
    after = trainer.backbone.state_dict()
    for k, v in snaps["w"].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v) or k == "fc.weight" and torch.isnan(after[k][0, 0]), k
    assert all(torch.equal(s["momentum_buffer"], snaps["m"][id(p)]) for p, s in trainer.optimizer.state.items())
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["nonfinite_steps"] for r in rows] == ["3", "5", "5", "5"]


def test_step_unless_leaves_parameters_and_state_bit_identical():
    for name in ("sgd", "adamw"):
        o = {"name": name, "lr": 0.1, "momentum": 0.9, "nesterov": False, "betas": [0.9, 0.999], "weight_decay": 5e-4,
             "head_lr_mult": 1.0, "head_weight_decay": None}
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
        opt = build_optimizer(o, [a], [b])
        for flag in (1.0, 0.0, 1.0, 0.0):  # skipped first step, a real one, a skipped one, a real one
            before = (a.detach().clone(), copy.deepcopy(opt.state_dict()["state"]))
            a.grad, b.grad = torch.randn(5), torch.full((3,), float("nan") if flag else 1.0)
            step_unless(opt, torch.tensor(flag))
            state = opt.state_dict()["state"]
            same = torch.equal(a, before[0]) and all(torch.equal(torch.as_tensor(state[i][k]), torch.as_tensor(v))
                                                     for i in before[1] for k, v in before[1][i].items())
            assert same == bool(flag), (name, flag)


# ------------------------------------------------------------------------------------------ evaluation sets
def _bin(path, seed: int, pairs: int = 10):
    imgs, flags = [], []
    for k in range(pairs):
        same = k % 2 == 0
        a, b = (k, k) if same else (k, k + 50)
        for ident, sample in ((a, 0), (b, 1)):
            imgs.append(cv2.imencode(".jpg", identity_sample(ident, sample, seed))[1].tobytes())
        flags.append(same)
    path.write_bytes(pickle.dumps((imgs, flags)))
    return path


def test_every_bin_set_is_evaluated_and_best_is_chosen_on_their_mean(tmp_path):
    """LFW, CFP-FP and AgeDB-30 style .bin files (generated): one accuracy column each, the mean in
    eval_accuracy, best.pt at the best mean; a missing optional set is skipped with a warning."""
    sets = [_bin(tmp_path / f"{n}.bin", i) for i, n in enumerate(("lfw", "cfp_fp", "agedb_30"))]
    paths = "[" + ", ".join(str(p) for p in sets) + f", {tmp_path / 'absent.bin'}]"
    cfg = load_config(None, [*BASE, f"output={tmp_path / 'run'}", "data.synthetic={identities: 6, per_identity: 4, seed: 0}",
                             "data.batch_size=4", "schedule.steps=4", "train.log_every=2", "eval.format=bin",
                             f"eval.path={paths}", "eval.every=2", "eval.optional=true"])
    with pytest.warns(UserWarning, match="evaluation set skipped"):
        trainer = Trainer(cfg)
    assert [n for n, _, _ in trainer.eval_sets] == ["lfw", "cfp_fp", "agedb_30"]
    summary = trainer.train()
    with open(tmp_path / "run" / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["eval_accuracy"]]
    assert len(rows) == 2
    for r in rows:
        accs = [float(r[f"eval_acc_{n}"]) for n in ("lfw", "cfp_fp", "agedb_30")]
        assert float(r["eval_accuracy"]) == pytest.approx(np.mean(accs), abs=1e-5)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert set(best["eval"]["sets"]) == {"lfw", "cfp_fp", "agedb_30"}
    assert summary["best_metric"] == pytest.approx(max(float(r["eval_accuracy"]) for r in rows), abs=1e-5)
    with pytest.raises(ConfigError, match="list of .bin files only with eval.format=bin"):
        load_config(None, ["data.format=synthetic", "eval.format=lfw", f"eval.path={paths}", "eval.pairs=p.txt"])


# ------------------------------------------------------------------------------------------ recipe details
@pytest.mark.parametrize("arch,kw", [("iresnet18", {"width": 0.125}), ("mobilefacenet", {"width": 0.25}),
                                     ("resnet34", {})])
def test_embedding_fc_and_bn1d_run_in_fp32_under_autocast(arch, kw):
    from train.backbones import build_backbone

    model = build_backbone(arch, 32, **kw).eval()
    neck = getattr(model, "neck", model)
    seen = {}
    neck.fc.register_forward_hook(lambda m, args, out: seen.update(fc_in=args[0].dtype, fc_out=out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 112, 112))
    assert out.dtype == seen["fc_in"] == seen["fc_out"] == torch.float32


def test_config_keys_for_scale():
    cfg = load_config(None, ["data.format=synthetic"])
    assert cfg["data"]["cache"] == "auto" and cfg["data"]["transfer"] == "uint8" and cfg["loss"]["sharded"] == "auto"
    r50 = load_config("train/configs/r50_arcface_ms1m.yaml")
    assert r50["optim"]["grad_clip"] == 5.0 and r50["optim"]["grad_clip_params"] == "backbone"
    assert r50["schedule"]["warmup_epochs"] > 0 and r50["data"]["cache"] in ("auto", "none")
    assert isinstance(r50["eval"]["path"], list) and len(r50["eval"]["path"]) == 3


def test_ddp_registration_check_catches_a_parameter_changed_after_construction():
    import torch.distributed as dist

    from train.distributed import check_ddp_registration

    from runtime.ports import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        net[1].weight.requires_grad_(False)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        good = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        check_ddp_registration(ddp, good, outside=[])
        net[1].weight.requires_grad_(True)  # what the old freezing code did after DDP was built
        with pytest.raises(AssertionError, match="DDP's reducer holds 3 tensors .* the optimizer updates 4"):
            check_ddp_registration(ddp, torch.optim.SGD(net.parameters(), lr=0.1), outside=[])
    finally:
        dist.destroy_process_group()

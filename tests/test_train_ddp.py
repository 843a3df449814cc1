"""Training in several processes: real ``torchrun`` runs with 2 CPU ranks (gloo) on generated identities.

* ranks stay bit-identical with freezing and unfreezing in the schedule (iResNet-18, whose BN1d scale is
  never trainable), and the 2-rank run equals one process accumulating the same global batch;
* the sharded margin head gives the full head's loss and gradients, holds half of it per rank, and learns;
* a run moves 2 → 1 → 2 processes without repeating or skipping a sample, on the same learning-rate curve.

Each rank runs one torch thread (``train.threads=1``); tests/ddp_worker.py is the rank's program.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.ports import free_port
from runtime.preprocess import to_model_input
from train.backbones import build_backbone
from train.config import load_config
from train.samplers import ShuffleBatchSampler
from train.schedule import WarmupCosine
from train.synthetic import identity_sample
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
pytestmark = pytest.mark.slow

CPU = ["train.device=cpu", "train.threads=1", "train.progress=false", "train.tensorboard=false", "data.workers=0",
       "data.format=synthetic", "train.checkpoint_every=0"]


def torchrun(tmp: Path, spec: dict, nproc: int = 2, timeout: float = 420) -> str:
    """Run tests/ddp_worker.py on ``nproc`` gloo ranks (loopback only); the output, or a failure with its tail."""
    spec_file = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(spec_file)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{out[-4000:]}")
    return out


def _dump(folder: Path, rank: int) -> dict:
    return torch.load(folder / f"rank{rank}.pt", weights_only=False)


FREEZE = ["arch=iresnet18", "backbone_kwargs={width: 0.125}", "embedding_size=32", "data.batch_size=4",
          "data.synthetic={identities: 16, per_identity: 4, seed: 0}", "loss.s=16.0", "loss.m=0.2",
          "loss.sharded=false", "optim.lr=0.1", "schedule.steps=24", "schedule.warmup_steps=2", "train.log_every=4",
          "schedule.freeze=[{modules: [conv1, bn1, prelu, layer1], until_step: 6}, {modules: [fc, features], until_step: 14}]"]


def test_ranks_stay_bit_identical_through_freezing_and_match_one_process(tmp_path):
    """24 steps on 2 ranks (3 epochs; layer1 frozen for 6 steps, the embedding FC/BN1d for 14): every parameter
    and buffer of the backbone, and the head, are bit-identical across the ranks; one process accumulating
    the same two micro-batches per step ends at the same parameters (tolerance 1e-5 of each tensor's scale)."""
    torchrun(tmp_path, {"scenario": "train", "dump": str(tmp_path / "dump"),
                        "overrides": [*CPU, *FREEZE, f"output={tmp_path / 'ddp'}"]})
    r0, r1 = _dump(tmp_path / "dump", 0), _dump(tmp_path / "dump", 1)
    assert r0["summary"]["step"] == 24
    for section in ("model", "head", "initial_model"):
        differ = [k for k in r0[section] if not torch.equal(r0[section][k], r1[section][k])]
        assert not differ, f"{section} differs between ranks: {differ[:5]}"
    assert not r0["model"]["features.weight"].requires_grad and torch.all(r0["model"]["features.weight"] == 1)
    assert not torch.equal(r0["model"]["layer1.0.conv1.weight"], r0["initial_model"]["layer1.0.conv1.weight"])

    single = Trainer(load_config(None, [*CPU, *FREEZE, f"output={tmp_path / 'one'}", "train.accumulate=2"]))
    single.train()
    mine = single.backbone.state_dict()
    for k, v in r0["model"].items():
        if v.dtype.is_floating_point and "running_" not in k:  # BN statistics: DDP keeps rank 0's micro-batch
            torch.testing.assert_close(mine[k], v, rtol=0, atol=1e-5 * max(1.0, float(v.abs().max())))
    torch.testing.assert_close(single.criterion.state_dict()["parts.arcface.head.weight"],
                               r0["head"]["parts.arcface.head.weight"], rtol=0, atol=1e-5)


def test_sharded_head_equals_full_head_and_halves_its_memory(tmp_path):
    """2 ranks, 11 classes (6 + 5), one unlabelled row: loss equal to 1e-5 relative, DDP-averaged backbone
    gradients and each shard's gradient equal to the full head's to 1e-5 of their scale, for ArcFace,
    CosFace + label smoothing, combined margin + label smoothing + focal; head bytes (weight, gradient,
    momentum) per rank half of one full head."""
    torchrun(tmp_path, {"scenario": "sharded_vs_full", "dump": str(tmp_path / "cmp")})
    for rank in (0, 1):
        out = json.loads((tmp_path / "cmp" / f"compare_rank{rank}.json").read_text())
        for name, c in out["cases"].items():
            assert c["loss"] == pytest.approx(c["ref_loss"], rel=1e-5), (rank, name, c)
            assert c["backbone_grad_max_diff"] <= 1e-5 * c["backbone_grad_max"], (rank, name, c)
            assert c["head_grad_max_diff"] <= 1e-5 * c["head_grad_max"], (rank, name, c)
        mem = out["memory"]
        if rank == 0:
            full = mem["full_bytes"]
            print(f"head bytes per rank: full {full}, shard {mem['shard_bytes']} ({mem['classes']} classes)")
        assert mem["shard_bytes"] == full // 2


def _separation(state: dict, kwargs: dict, identities: int = 40) -> float:
    crops = np.stack([identity_sample(i, s, 0) for i in range(identities) for s in range(4)])
    labels = np.repeat(np.arange(identities), 4)
    model = build_backbone("mobilefacenet", 64, **kwargs)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        emb = model(torch.from_numpy(to_model_input(crops, color_order="BGR"))).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = emb @ emb.T
    same, off = labels[:, None] == labels[None, :], ~np.eye(len(labels), dtype=bool)
    return float(cos[same & off].mean() - cos[~same].mean())


def test_sharded_head_with_class_sampling_learns(tmp_path):
    """400 identities (200 per rank) with sample_rate 0.5: the loss falls and same/different cosines of 40
    training identities separate; the backbones of both ranks stay bit-identical."""
    kwargs = {"width": 0.25, "stem_stride": 4}
    over = [*CPU, "arch=mobilefacenet", "backbone_kwargs={width: 0.25, stem_stride: 4}", "embedding_size=64",
            "data.synthetic={identities: 400, per_identity: 4, seed: 0}", "data.batch_size=16", "loss.s=16.0",
            "loss.m=0.2", "loss.sample_rate=0.5", "optim.lr=0.2", "schedule.steps=50", "schedule.warmup_steps=3",
            "train.log_every=5", f"output={tmp_path / 'run'}"]
    torchrun(tmp_path, {"scenario": "train", "dump": str(tmp_path / "dump"), "overrides": over})
    r0, r1 = _dump(tmp_path / "dump", 0), _dump(tmp_path / "dump", 1)
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    assert r0["head"]["parts.arcface.head.weight"].shape == (200, 64)
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    before, after = _separation(r0["initial_model"], kwargs), _separation(r0["model"], kwargs)
    print(f"loss {losses[0]:.2f} → {losses[-1]:.2f}; same−diff cosine {before:.3f} → {after:.3f}")
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses
    assert after > before + 0.2, (before, after)


RESUME = [*CPU, "arch=mobilefacenet", "backbone_kwargs={width: 0.25, stem_stride: 4}", "embedding_size=32",
          "data.synthetic={identities: 12, per_identity: 6, seed: 1}", "data.batch_size=4", "data.augment=flip",
          "loss.s=16.0", "loss.m=0.2", "optim.lr=0.1", "schedule.steps=14", "schedule.warmup_steps=2",
          "train.log_every=1"]


def test_resume_moves_between_two_and_one_process_without_losing_a_sample(tmp_path):
    """72 samples, batch 4 per process. 2 ranks run 5 steps (40 samples), 1 process resumes for 3 (12 samples),
    2 ranks finish: epoch 0 is consumed in order exactly once up to the dropped tail (< one global batch),
    and every step's learning rate is the schedule's at its global sample position."""
    out = tmp_path / "run"
    torchrun(tmp_path, {"scenario": "train", "dump": str(tmp_path / "a"),
                        "overrides": [*RESUME, f"output={out}", "train.stop_after=5"]})
    with pytest.warns(UserWarning, match=r"saved with 2 process\(es\) × batch 4 \(global 8\) on 1 process\(es\)"):
        one = Trainer(load_config(None, [*RESUME, f"output={out}", "train.stop_after=3"]), resume=True)
    assert one.position.sample_in_epoch == 40 and one.criterion.parts["arcface"].head.weight.shape[0] == 12
    seen_one: list[dict] = []
    one.callbacks.append(lambda t: seen_one.append({"indices": t.last_indices.tolist(), "lr": t.lr}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        one.train()
    text = torchrun(tmp_path, {"scenario": "train", "dump": str(tmp_path / "c"), "resume": True,
                               "overrides": [*RESUME, f"output={out}"]})
    assert "saved with 1 process(es) × batch 4 (global 4) on 2 process(es)" in text

    def steps(folder: str) -> list[list[dict]]:
        return [json.loads((tmp_path / folder / f"steps_rank{r}.json").read_text()) for r in (0, 1)]

    a, c = steps("a"), steps("c")
    assert all(s0["lr"] == s1["lr"] for s0, s1 in zip(*c))
    # the global order of a 2-rank step: rank 0's block, then rank 1's
    consumed = [i for s0, s1 in zip(*a) for i in s0["indices"] + s1["indices"]]
    consumed += [i for s in seen_one for i in s["indices"]]
    consumed += [i for s0, s1 in list(zip(*c))[:2] for i in s0["indices"] + s1["indices"]]  # samples 52..67
    order, _ = ShuffleBatchSampler(72, 4, seed=0).epoch_samples(0)
    assert consumed == order[:68].tolist() and len(set(consumed)) == 68  # 4 left: less than a global batch
    # global sample position before each step: 2 ranks ×8, 1 process ×4, 2 ranks ×8 into epoch 1
    samples = [8 * k for k in range(5)] + [40 + 4 * k for k in range(3)] + [52, 60] + [68 + 8 * k for k in range(6)]
    lrs = [s["lr"] for s in a[0]] + [s["lr"] for s in seen_one] + [s["lr"] for s in c[0]]
    f = WarmupCosine(14, 2)
    assert lrs == pytest.approx([0.1 * f(x / 8) for x in samples], rel=1e-9)
    final = _dump(tmp_path / "c", 0)
    assert final["position"]["samples_seen"] >= 14 * 8 > final["position"]["samples_seen"] - 8
    assert all(torch.equal(final["model"][k], _dump(tmp_path / "c", 1)["model"][k]) for k in final["model"])

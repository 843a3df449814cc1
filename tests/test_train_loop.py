"""Recognizer training on CPU: it learns, resumes exactly, survives SIGKILL mid-checkpoint and SIGTERM, and the
smoke CLI keeps its contract. MobileFaceNet at width 0.25 keeps this affordable on 2 shared cores (the
full-width network costs ~13× more per step; the smoke CLI test runs it for a few steps)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import data_dir
from train.checkpoint import load_checkpoint
from train.config import load_config
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

BASE = ["arch=mobilefacenet", "backbone_kwargs={width: 0.25}", "embedding_size=64", "train.device=cpu",
        "train.threads=1", "train.progress=false", "train.tensorboard=false", "data.workers=0",
        "data.format=synthetic", "loss.s=16.0", "loss.m=0.2", "optim.lr=0.1", "schedule.warmup_steps=2"]


def _cfg(out: Path, *extra: str) -> dict:
    return load_config(None, [*BASE, f"output={out}", *extra])


@pytest.fixture
def facekit_data_optional() -> Path | None:
    """$FACEKIT_DATA when present (real CelebA crops), else None (generated identities)."""
    d = data_dir()
    return d if d.is_dir() else None


def _pair_separation(trainer: Trainer, crops: np.ndarray, labels: np.ndarray) -> float:
    emb = trainer.embed(crops)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cos = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return float(cos[same & off].mean() - cos[~same].mean())


def test_training_learns_identities(tmp_path, facekit_data_optional):
    """A few hundred steps: the loss falls and same-identity cosines separate from different-identity ones."""
    celeba = facekit_data_optional / "celeba" / "identity_aligned.txt" if facekit_data_optional else None
    extra = ["schedule.steps=200", "data.batch_size=16", "data.augment=flip", "train.log_every=20",
             "train.checkpoint_every=0", "optim.lr=0.2"]
    if celeba is not None and celeba.is_file():  # real CelebA faces: 32 identities with ≥ 5 crops each
        extra += ["data.format=list", f"data.list={celeba}", f"data.root={celeba.parent / 'aligned_89x109'}",
                  "data.min_per_identity=5", "data.max_identities=32"]
    else:
        extra += ["data.synthetic={identities: 32, per_identity: 6, seed: 0}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CelebA's 89×109 crops are resized
        trainer = Trainer(_cfg(tmp_path / "run", *extra))
    ds = trainer.dataset
    crops = np.stack([ds.crop(i) for i in range(len(ds))])
    before = _pair_separation(trainer, crops, ds.labels)
    summary = trainer.train()
    after = _pair_separation(trainer, crops, ds.labels)
    with open(tmp_path / "run" / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    print(f"loss {losses[0]:.2f} → {losses[-1]:.2f}; same−diff cosine {before:.3f} → {after:.3f}")
    assert summary["step"] == 200 and len(losses) == 10
    assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2]), losses
    assert after > before + 0.2 and after > 0.3, (before, after)


def _weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"head.{k}": v for k, v in ckpt["head"].items()}}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"


# dropout and the "strong" augmentations make exactness depend on every RNG being restored
RESUME = ["backbone_kwargs={width: 0.25, dropout: 0.2}", "data.synthetic={identities: 12, per_identity: 4, seed: 1}",
          "data.batch_size=8", "data.augment=strong", "schedule.steps=10", "train.log_every=1",
          "train.checkpoint_every=3", "optim.name=sgd"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 10-step run (6 batches per epoch, so it crosses an epoch boundary)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    Trainer(_cfg(out, *RESUME)).train()
    return out


def test_resume_after_exception_is_exact(tmp_path, reference_run):
    out = tmp_path / "run"

    def crash_at_7(trainer):
        if trainer.step == 7:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer(_cfg(out, *RESUME), callbacks=[crash_at_7]).train()
    assert load_checkpoint(out / "last.pt")["step"] == 7  # written on the way out
    with pytest.warns(UserWarning, match="changed config: data.workers"):
        trainer = Trainer(_cfg(out, *RESUME, "data.workers=2"), resume=True)  # workers must not matter
    summary = trainer.train()
    assert summary["step"] == 10
    _assert_same_weights(out / "last.pt", reference_run / "last.pt")
    with open(out / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))  # no duplicated rows
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(out, *RESUME))


def _logged_steps(path: Path) -> list[int]:
    try:
        with open(path) as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("step", "").isdigit()]
    except OSError:
        return []


def _run_cli(cfg_file: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train" / "arcface.py"), "--config", str(cfg_file), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_during_checkpoint_write_then_sigterm_then_resume(tmp_path, reference_run):
    """SIGKILL while last.pt is being written leaves a loadable checkpoint; SIGTERM stops with a checkpoint;
    --resume then finishes with exactly the uninterrupted run's weights."""
    out = tmp_path / "run"
    cfg = _cfg(out, *RESUME, "train.checkpoint_every=1")
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))

    proc = _run_cli(cfg_file)
    caught, deadline = None, time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        tmp = [n for n in os.listdir(out) if n.startswith(".last.pt.")] if out.is_dir() else []
        if tmp and (out / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)
            caught = tmp[0]
            break
        time.sleep(0.0005)
    proc.wait(30)
    if caught is None:
        pytest.fail(f"never saw a checkpoint being written (rc={proc.returncode}): {proc.stdout.read()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(out / "last.pt")["step"]  # the previous complete checkpoint
    assert 1 <= killed_at < 10

    # resume; stop it with SIGTERM once it has made progress: it must save and say where its output is
    proc = _run_cli(cfg_file, "--resume")
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        # the killed run may have logged killed_at + 1 before dying: wait for a step beyond that
        if _logged_steps(out / "log.csv") and max(_logged_steps(out / "log.csv")) > killed_at + 1:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    text, _ = proc.communicate(timeout=120)
    stopped_at = load_checkpoint(out / "last.pt")["step"]
    if proc.returncode == 0:  # the run finished before the signal arrived
        assert stopped_at == 10, text
    else:
        assert proc.returncode == 128 + signal.SIGTERM, text
        assert "stopped: SIGTERM" in text and killed_at < stopped_at < 10
    assert text.strip().splitlines()[-1] == f"output: {out}"

    print(f"SIGKILL while writing {caught} (last complete: step {killed_at}); SIGTERM → rc {proc.returncode}, "
          f"checkpoint at step {stopped_at}")
    proc = _run_cli(cfg_file, "--resume")
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, text
    _assert_same_weights(out / "last.pt", reference_run / "last.pt")
    assert not list(out.glob(".*.tmp"))  # the killed writer's temp file was cleared


def test_smoke_config_cli(tmp_path):
    """The smoke config's command (full-width MobileFaceNet, generated identities, 6 steps instead of 30) prints
    ``output: <dir>`` last and writes log.csv, TensorBoard scalars and checkpoints."""
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "train/arcface.py", "--config", "train/configs/smoke.yaml", "--set", f"output={out}",
         "--set", "schedule.steps=6", "train.log_every=2", "data.root=/nonexistent", "data.list=/nonexistent/list.txt"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"output: {out}"
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= set(rows[0])
    assert [int(r["step"]) for r in rows if r["loss"]] == [2, 4, 6]
    assert (out / "last.pt").is_file() and (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert load_checkpoint(out / "last.pt")["config"]["arch"] == "mobilefacenet"


def test_trainer_options_run(tmp_path):
    """P×K sampler with ArcFace + focal + center + triplet, AdamW, clipping, freezing, channels_last, bf16
    autocast and warm restarts: a few steps run and the frozen layers stay put while frozen."""
    cfg = _cfg(tmp_path / "opt", "data.synthetic={identities: 8, per_identity: 4, seed: 2}", "data.sampler=pk",
               "data.pk_p=4", "data.pk_k=2", "data.batch_size=8", "loss.focal_gamma=2.0", "loss.center={weight: 0.01}",
               "loss.triplet={weight: 1.0, margin: 0.3}", "optim.name=adamw", "optim.lr=0.001", "optim.grad_clip=1.0",
               "schedule.freeze=[{modules: [body.0], until_step: 2}]", "train.channels_last=true", "train.amp=bf16",
               "schedule.steps=4", "schedule.restarts=1", "train.log_every=1", "train.checkpoint_every=0")
    seen = {}

    def record(trainer):
        seen[trainer.step] = trainer.backbone.body[0].conv.weight.detach().clone()

    trainer = Trainer(cfg, callbacks=[record])
    w0 = trainer.backbone.body[0].conv.weight.detach().clone()
    trainer.train()
    assert torch.equal(seen[1], w0) and torch.equal(seen[2], w0) and not torch.equal(seen[4], w0)
    with open(tmp_path / "opt" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"loss_arcface", "loss_center", "loss_triplet"} <= set(rows[0])
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_init_warm_starts_weights_only(tmp_path, reference_run):
    """`init` copies the weights (and a head of the same shape) but starts the optimizer, step and schedule
    afresh; a checkpoint of another shape is refused with a message naming the file."""
    cfg = _cfg(tmp_path / "warm", *RESUME, f"init={reference_run / 'last.pt'}", "schedule.steps=2")
    trainer = Trainer(cfg)
    ref = load_checkpoint(reference_run / "last.pt")
    assert trainer.step == 0 and trainer.initialised_from == reference_run / "last.pt"
    assert all(torch.equal(v, ref["model"][k]) for k, v in trainer.backbone.state_dict().items())
    assert all(torch.equal(v, ref["head"][k]) for k, v in trainer.criterion.state_dict().items())
    assert trainer.position.samples_seen == 0  # fresh schedule, no momentum
    assert all(not s["momentum_buffer"].any() for s in trainer.optimizer.state.values())
    trainer.train()
    assert load_checkpoint(tmp_path / "warm" / "last.pt")["step"] == 2
    with pytest.raises(ValueError, match="init: .*last.pt does not fit"):
        Trainer(_cfg(tmp_path / "wide", *RESUME, "backbone_kwargs={width: 0.5}", f"init={reference_run / 'last.pt'}"))


def test_resume_does_not_swallow_an_override(tmp_path):
    """`--resume key=value` resumes the config's run and applies the override (argparse alone would take
    `key=value` for --resume's optional checkpoint path); a real path after --resume stays a path."""
    from train.arcface import parse_args

    args = parse_args(["--config", "c.yaml", "--resume", "schedule.epochs=9", "train.threads=2"])
    assert args.resume is True and args.overrides == ["schedule.epochs=9", "train.threads=2"]
    run = tmp_path / "a=b"
    run.mkdir()
    args = parse_args(["--config", "c.yaml", "--resume", str(run), "train.threads=2"])
    assert args.resume == str(run) and args.overrides == ["train.threads=2"]


def test_resume_with_a_longer_schedule_follows_the_new_schedule(tmp_path):
    """Resuming with more steps continues on the new cosine, not on the checkpoint's (LambdaLR's
    load_state_dict would otherwise write the old total back into the schedule)."""
    out = tmp_path / "run"
    Trainer(_cfg(out, *RESUME, "schedule.steps=6")).train()
    with pytest.warns(UserWarning, match="changed config: schedule.steps"):
        trainer = Trainer(_cfg(out, *RESUME, "schedule.steps=40"), resume=True)
    assert trainer.step == 6 and trainer.lr_lambda.total == 40
    seen = []
    trainer.callbacks.append(lambda t: seen.append(t.optimizer.param_groups[0]["lr"]))
    trainer.cfg["train"]["stop_after"] = 2
    trainer.train()
    expected = [0.1 * trainer.lr_lambda(k) for k in (7, 8)]
    assert seen == pytest.approx(expected) and seen[0] > 0.05  # the 6-step schedule would be at its minimum


def test_widened_checkpoint_starts_a_wider_network_at_the_narrow_ones_function(tmp_path, reference_run):
    """The widening recipe grows the width-0.25 reference run to width 0.5 (a checkpoint used as ``init``);
    embeddings stay those of the narrow checkpoint, up to the symmetry-breaking noise, and a wrong
    architecture is refused."""
    from recipes.mobilefacenet_distill.widen import widen_checkpoint

    narrow = Trainer(_cfg(tmp_path / "narrow", *RESUME, f"init={reference_run / 'last.pt'}"))
    widened = widen_checkpoint(reference_run / "last.pt", _cfg(tmp_path / "cfg", *RESUME, "backbone_kwargs={width: 0.5}"),
                               tmp_path / "widened.pt")
    wide = Trainer(_cfg(tmp_path / "wide", *RESUME, "backbone_kwargs={width: 0.5}", f"init={widened}"))
    assert sum(p.numel() for p in wide.backbone.parameters()) > 2 * sum(p.numel() for p in narrow.backbone.parameters())
    crops = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    a, b = narrow.embed(crops), wide.embed(crops)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.95
    with pytest.raises(ValueError, match="not the same network"):
        widen_checkpoint(reference_run / "last.pt", _cfg(tmp_path / "other", *RESUME, "arch=iresnet18", "backbone_kwargs={}"),
                         tmp_path / "other.pt")
    with pytest.raises(ValueError, match="init: .*last.pt does not fit"):
        Trainer(_cfg(tmp_path / "other", *RESUME, "arch=iresnet18", "backbone_kwargs={}", f"init={reference_run / 'last.pt'}"))
"""Checkpoints: round trip, clear errors for truncated/foreign files, atomic under SIGKILL."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import sys
import time

import pytest
import torch

from train.backbones import build_backbone
from train.checkpoint import (CheckpointError, build_model_from_checkpoint, checkpoint_sha256, load_checkpoint,
                              save_checkpoint)

CONFIG = {"task": "recognition", "arch": "mobilefacenet", "embedding_size": 64}


def _trained_like_model():
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", 64)
    with torch.no_grad():  # non-default BN statistics, so a fresh model cannot pass for the saved one
        model.train()(torch.randn(2, 3, 112, 112))
    return model.eval()


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = _trained_like_model()
    path = save_checkpoint(tmp_path / "run" / "last.pt", {"model": model.state_dict(), "config": CONFIG, "step": 7})
    assert path.is_file() and list(path.parent.iterdir()) == [path], "no temp files may be left behind"
    state = load_checkpoint(path)
    assert state["step"] == 7 and state["config"] == CONFIG
    rebuilt, config = build_model_from_checkpoint(path)
    assert config == CONFIG and not rebuilt.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    model = _trained_like_model()
    prefixed = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", {"model": prefixed, "config": CONFIG})
    rebuilt, _ = build_model_from_checkpoint(tmp_path / "c.pt")
    torch.testing.assert_close(rebuilt.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_sha256_is_the_file_digest(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.arange(5)}})
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_and_foreign_files_raise_checkpoint_error_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "good.pt", {"model": _trained_like_model().state_dict(), "config": CONFIG})
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        bad = tmp_path / f"truncated_{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=bad.name):
            load_checkpoint(bad)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    bare = tmp_path / "bare_state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(CheckpointError, match="not a facekit checkpoint"):
        load_checkpoint(bare)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_config_are_a_checkpoint_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"model": _trained_like_model().state_dict(),
                                               "config": {**CONFIG, "embedding_size": 128}})
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model_from_checkpoint(path)
    no_config = save_checkpoint(tmp_path / "n.pt", {"model": {}})
    with pytest.raises(CheckpointError, match="config"):
        build_model_from_checkpoint(no_config)


def test_landmarks_checkpoints_go_through_the_aligner_builder(tmp_path):
    from train.hourglass import build_aligner

    config = {"task": "landmarks"}
    model = build_aligner(config)
    path = save_checkpoint(tmp_path / "a.pt", {"model": model.state_dict(), "config": config})
    rebuilt, _ = build_model_from_checkpoint(path)
    assert type(rebuilt) is type(model) and not rebuilt.training


def _writer(path: str, saved, size: int) -> None:
    """Save checkpoints forever: step i holds a tensor filled with i; ``saved`` counts completed saves."""
    torch.set_num_threads(1)
    i = saved.value
    while True:
        i += 1
        save_checkpoint(path, {"model": {"w": torch.full((size,), float(i))}, "step": i})
        saved.value = i


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork and SIGKILL")
def test_sigkilled_writer_always_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    size = 1 << 20  # 4 MB of float32: each save takes a few ms, so kills land mid-write
    save_checkpoint(path, {"model": {"w": torch.zeros(size)}, "step": 0})
    ctx = mp.get_context("fork")
    saved = ctx.Value("i", 0, lock=False)  # a lock held by a killed writer would never be released
    rng = random.Random(0)
    kills, mid_write, deadline = 0, 0, time.monotonic() + 60.0
    while kills < 50 and time.monotonic() < deadline:
        before = saved.value
        proc = ctx.Process(target=_writer, args=(str(path), saved, size), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
        mid_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        state = load_checkpoint(path)  # must never raise
        step = state["step"]
        # the last counted save, or one more when the kill fell between os.replace and the count
        assert step in (saved.value, saved.value + 1) and step >= before
        assert torch.all(state["model"]["w"] == float(step)), "a checkpoint mixes two saves"
    assert kills == 50 and saved.value > 0, f"only {kills} kills and {saved.value} completed saves"
    assert mid_write > 0, "no kill landed during a write; the test proved nothing"
    # temp files of killed writers are cleaned up by the next successful save
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "step": -1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

"""Aligner training: the validated config schema, the loop's exact resume, the CLI's one-line errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, link_faces
from train.config import load_config

CONFIG = ROOT / "train" / "configs" / "aligner_300w.yaml"
TINY = ["stacks=1", "channels=8", "depth=2", "input_size=[64, 64]", "heatmap_size=[16, 16]", "optim.batch_size=4",
        "optim.epochs=2", "optim.warmup_steps=2", "optim.checkpoint_every=1", "optim.eval_every=1",
        "optim.max_minutes=0", "loss.foreground_weight=10", "loss.coord_weight=1"]


def test_the_shipped_aligner_config_validates():
    cfg = load_config(CONFIG)
    assert cfg["task"] == "landmarks" and cfg["name"] == "aligner_300w"
    assert cfg["optim"]["batch_size"] == 8 and cfg["derotate"] is True
    assert isinstance(cfg["augment"]["rotation"], float)  # `rotation: 30` in the file, converted
    assert cfg["data"]["train"] == ["train", "afw"]


def _tiny_data(facekit_data: Path, root: Path) -> Path:
    """8 training and 4 test faces of 300-W AFW, linked into ``root``/{train,test}."""
    afw = facekit_data / "landmarks_300w" / "afw"
    link_faces(afw, root / "train", 8)
    link_faces(afw, root / "test", 4, start=8)
    return root


@pytest.mark.slow
def test_interrupted_training_resumes_exactly(facekit_data, tmp_path):
    """Two steps, a checkpoint, a fresh process state resuming from it: the same weights as one
    uninterrupted run; log.csv holds each step once; the run writes metrics.json and the curve."""
    from train.aligner_loop import AlignerRun

    data = _tiny_data(facekit_data, tmp_path / "data")
    cfg = load_config(CONFIG, [*TINY, f"data.root={data}", "data.train=[train]"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = AlignerRun(cfg, tmp_path / "whole", progress=False)
        metrics = whole.train()
        part = AlignerRun(cfg, tmp_path / "part", progress=False)
        for _ in range(2):
            part.train_step()
            part.log.write({"step": part.step, "loss": 1.0})
        part.checkpoint()
        part.log.write({"step": 3, "loss": 1.0})  # a logged step after the checkpoint: dropped on resume
        part.log.close()
        resumed = AlignerRun(cfg, tmp_path / "part", resume=True, progress=False)
        assert resumed.step == 2
        resumed.train()
    finally:
        torch.set_num_threads(threads)
    assert whole.step == resumed.step == 4  # 8 faces / batch 4 × 2 epochs
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["steps"] == 4
    assert 0 < metrics["nme"] and metrics["images"] + metrics["missed"] == 4
    # the fallback rule is measured on the training faces and travels in the checkpoint's config
    from train.aligner_refiner import TorchRefiner

    rule = metrics["fallback"]
    assert set(rule) == {"min_peak", "max_disagreement"} and rule["max_disagreement"] > 0
    assert "fallback_nme" in metrics and 0 <= metrics["kept"] <= 1
    assert TorchRefiner(tmp_path / "whole" / "last.pt").fallback.to_dict() == rule
    assert (tmp_path / "whole" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "part" / "log.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert 3 not in steps and steps == sorted(set(steps))


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "train" / "aligner.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    bad = run("--config", str(CONFIG), "--set", "optim.lrr=1")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    export = run("--export", "x.pt")
    assert export.returncode == 2 and "python export/to_onnx.py --checkpoint" in export.stderr
    missing = run("--eval", str(tmp_path / "none.onnx"), "--data", str(tmp_path))
    assert missing.returncode == 2 and "none.onnx not found" in missing.stderr

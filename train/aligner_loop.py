"""Training the hourglass aligner: loss, the loop with exact resume, the training-curve plot.

    cfg = load_config("train/configs/aligner_300w.yaml")     # train.config's aligner schema
    metrics = train(cfg, Path("runs/aligner_default"), resume=False)

The run folder gets ``last.pt`` (atomic, every ``optim.checkpoint_every`` steps and at each epoch's end;
model, optimizer, step, RNG states, elapsed time), ``log.csv``, ``metrics.json`` and ``training_curve.png``.
At the end the fallback rule (:class:`runtime.landmarks.FallbackRule`) is measured on the training faces
(unless the config gives one) and stored in the final checkpoint's config, so the export carries it.
The learning rate warms up linearly, then follows a cosine to zero over the schedule (the trainer's
:class:`train.schedule.WarmupCosine`); the schedule position is the steps done or the ``optim.max_minutes``
budget used, whichever is further, so a time-capped run still ends annealed.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from evaluation.landmarks import fallback_rule
from runtime.files import atomic_write_bytes
from runtime.landmark_fallback import FallbackRule
from runtime.landmarks import AlignerGeometry

from .aligner_refiner import evaluate_model, predict_torch
from .checkpoint import load_checkpoint, save_checkpoint
from .config import expand_path
from .hourglass import build_aligner
from .landmark_data import Augmenter, LandmarkData, make_batch
from .schedule import WarmupCosine
from .trainlog import CSVLog

LOG_COLUMNS = ["step", "epoch", "lr", "loss", "elapsed_s", "test_nme", "test_failure_rate"]


def soft_argmax(heatmaps: torch.Tensor, beta: float) -> torch.Tensor:
    """Differentiable peak position (N,K,2) in heatmap pixels: expectation under softmax(beta · heatmap).

    Used only as a training signal; inference decodes with :func:`runtime.landmarks.decode_heatmaps`.
    """
    n, k, h, w = heatmaps.shape
    prob = torch.softmax(beta * heatmaps.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
    xs = torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device)
    ys = torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device)
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], dim=-1)


def heatmap_loss(outputs: list[torch.Tensor], target: torch.Tensor, points: torch.Tensor | None = None,
                 foreground_weight: float = 0.0, coord_weight: float = 0.0, beta: float = 20.0) -> torch.Tensor:
    """Intermediate supervision, summed over every stack: MSE against the Gaussian targets (pixels weighted
    1 + ``foreground_weight`` × target, so the peaks are not drowned by the background), plus
    ``coord_weight`` × the L1 distance (in heatmap widths) between the soft-argmax of each map and the
    target point, for points inside the map."""
    weight = 1.0 + foreground_weight * target
    total = 0.0
    for o in outputs:
        total = total + (weight * (o - target) ** 2).mean()
        if coord_weight and points is not None:
            h, w = target.shape[-2:]
            inside = ((points[..., 0] >= 0) & (points[..., 0] <= w - 1) & (points[..., 1] >= 0)
                      & (points[..., 1] <= h - 1)).to(o.dtype)
            err = (soft_argmax(o, beta) - points).abs().sum(-1) / w
            total = total + coord_weight * (err * inside).sum() / inside.sum().clamp(min=1.0)
    return total


class AlignerRun:
    """One aligner training run in ``out`` (see the module docstring); ``train()`` runs it to the end."""

    def __init__(self, cfg: dict[str, Any], out: Path, resume: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.opt_cfg, self.loss_cfg = cfg["optim"], cfg["loss"]
        torch.set_num_threads(int(self.opt_cfg["threads"]))
        cv2.setNumThreads(1)
        self.out.mkdir(parents=True, exist_ok=True)
        self.geometry = AlignerGeometry.from_dict(cfg)
        root = expand_path(cfg["data"]["root"])
        self.train_set = LandmarkData([root / d for d in cfg["data"]["train"]], self.out / "detections_train.npz",
                                      progress)
        self.test_set = LandmarkData([root / cfg["data"]["test"]], self.out / "detections_test.npz", progress)
        self.seed = int(cfg["seed"])
        torch.manual_seed(self.seed)
        self.model = build_aligner(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(self.opt_cfg["lr"]),
                                           weight_decay=float(self.opt_cfg["weight_decay"]))
        self.batch_size = int(self.opt_cfg["batch_size"])
        self.steps_per_epoch = max(1, len(self.train_set) // self.batch_size)
        self.total = self.steps_per_epoch * int(self.opt_cfg["epochs"])
        self.warmup = int(self.opt_cfg["warmup_steps"])
        self.schedule = WarmupCosine(self.total, self.warmup)
        self.budget_s = float(self.opt_cfg["max_minutes"]) * 60
        self.rng = np.random.default_rng(self.seed)
        self.step, self.elapsed = 0, 0.0
        self.last = self.out / "last.pt"
        resumed = resume and self.last.is_file()
        if resumed:
            self._restore(load_checkpoint(self.last))
        elif resume:
            print(f"no {self.last} yet: starting from scratch")
        self.augment = Augmenter(self.geometry, cfg["augment"], self.rng)
        self.base_angles = self.train_set.base_angles(self.geometry)
        self.log = CSVLog(self.out / "log.csv", LOG_COLUMNS, self.step if resumed else None)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        self.step, self.elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        print(f"resumed from {self.last} at step {self.step}/{self.total} ({self.elapsed / 60:.1f} min trained)")

    def position(self) -> float:
        """Schedule position in [0, 1]: steps done, or the time budget used, whichever is further."""
        return max(self.step / self.total, self.elapsed / self.budget_s if self.budget_s else 0.0)

    def lr(self) -> float:
        """Linear warm-up over the first steps, then the cosine at the schedule position."""
        k = self.step if self.step < self.warmup else self.position() * self.total
        return float(self.opt_cfg["lr"]) * self.schedule(k)

    def checkpoint(self, metrics: dict | None = None) -> None:
        save_checkpoint(self.last, {
            "model": self.model.state_dict(), "config": self.cfg, "step": self.step,
            "optimizer": self.optimizer.state_dict(), "scheduler": {"lr": self.optimizer.param_groups[0]["lr"]},
            "scaler": None, "sampler": {"seed": self.seed}, "head": None, "best_metric": metrics,
            "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state()},
            "elapsed_s": self.elapsed})

    def train_step(self) -> float:
        """One optimiser step on the next batch of the epoch's permutation; returns the loss."""
        epoch, i = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng(self.seed + 1000 * epoch).permutation(len(self.train_set))
        data = self.train_set
        views = [self.augment(data.images[j], data.boxes[j], data.points[j], self.base_angles[j])
                 for j in order[i * self.batch_size:(i + 1) * self.batch_size]]
        x, y, pts = make_batch([v[0] for v in views], [v[1] for v in views], self.geometry)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        loss = heatmap_loss(self.model.forward_stacks(x), y, pts, **self.loss_cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def train(self) -> dict[str, float]:
        """Run to the end of the schedule; returns the final test metrics (also in ``metrics.json``)."""
        from tqdm import tqdm

        bar = tqdm(total=self.total, initial=self.step, desc="training aligner", disable=not self.progress)
        self.model.train()
        t0, losses = time.time() - self.elapsed, []
        done = self.position() >= 1.0
        while not done:
            losses.append(self.train_step())
            self.elapsed = time.time() - t0
            done = self.position() >= 1.0
            epoch = (self.step - 1) // self.steps_per_epoch
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.2e}", epoch=epoch, lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
            end_of_epoch = self.step % self.steps_per_epoch == 0
            metrics = {}
            if end_of_epoch and (epoch + 1) % int(self.opt_cfg["eval_every"]) == 0 and not done:
                metrics = evaluate_model(self.model, self.test_set, self.geometry)
                bar.write(f"epoch {epoch + 1}: test NME {metrics['nme']:.4f} failure {metrics['failure_rate']:.3f} "
                          f"(detector {metrics['detector_nme']:.4f})")
            if self.step % 10 == 0 or metrics:
                self.log.write({"step": self.step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                                "loss": float(np.mean(losses[-10:])), "elapsed_s": round(self.elapsed, 1),
                                "test_nme": metrics.get("nme", ""), "test_failure_rate": metrics.get("failure_rate", "")})
            if self.step % int(self.opt_cfg["checkpoint_every"]) == 0 or end_of_epoch or done:
                self.checkpoint(metrics or None)
        bar.close()
        self.log.close()
        if self.cfg["fallback"] is None and self.cfg["fallback_coverage"] > 0:
            self.cfg = {**self.cfg, "fallback": self.measure_fallback().to_dict()}
        metrics = evaluate_model(self.model, self.test_set, self.geometry, FallbackRule.from_metadata(self.cfg))
        metrics.update(train_minutes=self.elapsed / 60, steps=self.step, fallback=self.cfg["fallback"])
        self.checkpoint(metrics)
        atomic_write_bytes(self.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        plot_log(self.out / "log.csv", self.out / "training_curve.png")
        return metrics


    def measure_fallback(self) -> FallbackRule:
        """The fallback rule measured on the training faces the detector found (``fallback_coverage``)."""
        crops, mats = self.train_set.runtime_crops(self.geometry)
        points, peaks = predict_torch(self.model, crops, mats, self.geometry)
        found = self.train_set.detected
        return fallback_rule(self.train_set.det_landmarks[found], points[found], peaks[found],
                             self.cfg["fallback_coverage"])


def train(cfg: dict[str, Any], out: Path, resume: bool = False, progress: bool = True) -> dict[str, float]:
    """Train the aligner a validated config describes into ``out``; returns the final test metrics."""
    return AlignerRun(cfg, out, resume, progress).train()


def plot_log(log_csv: Path, png: Path) -> Path | None:
    """Training loss and test NME against the step, from log.csv, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.8, label="training loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [(int(r["step"]), 100 * float(r["test_nme"])) for r in rows if r.get("test_nme")]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label="test NME %")
        ax2.set_ylabel("test NME (% of inter-ocular distance)")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(png, buf.getvalue())

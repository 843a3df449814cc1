"""What a training run reports: ``log.csv`` rows, TensorBoard scalars, and the per-window statistics behind them.

Statistics stay on the device between log rows (:class:`Window` adds device tensors); a row reads them once
(one host synchronisation per ``train.log_every`` steps).
"""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import torch

from runtime.files import atomic_write_bytes

EVAL_COLUMNS = ["eval_accuracy", "eval_threshold_cosine", "eval_cos_same", "eval_cos_diff"]


class CSVLog:
    """``log.csv`` with a fixed header; on resume rows after the resumed step are dropped (no duplicates)."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path, self.columns = path, columns
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, columns, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def log_columns(part_names: list[str], eval_names: list[str]) -> list[str]:
    """The ``log.csv`` header: per-set accuracy columns appear when there is more than one evaluation set."""
    per_set = [f"eval_acc_{n}" for n in eval_names] if len(eval_names) > 1 else []
    return (["step", "epoch", "loss", "lr"] + [f"loss_{p}" for p in part_names]
            + ["grad_norm", "nonfinite_steps", "images_per_s", "data_wait", "elapsed_s"] + EVAL_COLUMNS + per_set)


def eval_columns(ev: dict | None) -> dict:
    """``log.csv`` columns of an evaluation (:meth:`train.trainer.Trainer.evaluate`'s result)."""
    if not ev:
        return {}
    out = {"eval_accuracy": ev["accuracy"], "eval_threshold_cosine": ev["threshold_cosine"],
           "eval_cos_same": ev["cos_same"], "eval_cos_diff": ev["cos_diff"]}
    if len(ev.get("sets", {})) > 1:
        out.update({f"eval_acc_{n}": r["accuracy"] for n, r in ev["sets"].items()})
    return out


class Window:
    """Sums over the steps since the last log row, kept on the device until :meth:`row` reads them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nonfinite_run = torch.zeros((), device=device)  # consecutive non-finite steps, across windows
        self.reset(time.time())

    def reset(self, now: float) -> None:
        self.t0, self.images, self.wait, self.steps = now, 0, 0.0, 0
        self.sums: dict[str, torch.Tensor] = {}
        self.finite_steps = torch.zeros((), device=self.device)
        self.nonfinite = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], found_inf: torch.Tensor,
            grad_norm: torch.Tensor, images: int, wait: float) -> None:
        ok = 1.0 - found_inf
        for k, v in {"loss": loss, **parts}.items():
            v = torch.nan_to_num(v.detach().float(), nan=0.0, posinf=0.0, neginf=0.0) * ok
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.grad_norm = self.grad_norm + torch.nan_to_num(grad_norm.detach().float(), nan=0.0, posinf=0.0) * ok
        self.finite_steps = self.finite_steps + ok
        self.nonfinite = self.nonfinite + found_inf
        self.nonfinite_run = (self.nonfinite_run + 1) * found_inf
        self.images += images
        self.wait += wait
        self.steps += 1

    def read(self, now: float, part_names: list[str]) -> tuple[dict, int]:
        """The window's means (keys as in :func:`log_columns`) and the current run of consecutive
        non-finite steps, read from the device in one synchronisation."""
        keys = ["loss", *part_names]
        zero = torch.zeros((), device=self.device)
        values = torch.stack([self.sums.get(k, zero) for k in keys]
                             + [self.grad_norm, self.finite_steps, self.nonfinite, self.nonfinite_run]).tolist()
        *sums, grad_norm, finite, nonfinite, run = values
        span = max(now - self.t0, 1e-9)
        mean = (lambda v: v / finite) if finite else (lambda v: float("nan"))
        row = {"loss": mean(sums[0]), **{f"loss_{k}": mean(v) for k, v in zip(part_names, sums[1:])},
               "grad_norm": mean(grad_norm), "nonfinite_steps": int(nonfinite), "images_per_s": self.images / span,
               "data_wait": self.wait / span}
        return row, int(run)


def write_tensorboard(tb, row: dict, step: int) -> None:
    for k, v in row.items():
        if k not in ("step", "epoch", "nonfinite_steps") and isinstance(v, float) and math.isfinite(v):
            tb.add_scalar(k.replace("eval_acc_", "eval/acc_").replace("eval_", "eval/").replace("loss_", "loss/"), v, step)

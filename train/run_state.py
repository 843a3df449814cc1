"""What a training run keeps on disk and restores: :class:`RunStateMixin`, the checkpoint half of
:class:`train.trainer.Trainer`.

A checkpoint holds the backbone, the *full* head (a sharded head's shards are gathered onto rank 0, their
optimizer state too), the optimizer, the AMP scaler, the run's position in global samples
(:class:`train.schedule.RunPosition`), the sampler and the python / numpy / torch RNG states. Loading cuts
the head and its optimizer state back to this rank's shard, so a run resumes on any number of processes;
a different process layout is named in a warning.
"""
from __future__ import annotations

import random
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import diff_configs
from .schedule import RunPosition, describe_layout_change, legacy_position
from .sharded_head import full_head_state, full_optimizer_state, own_head_state, own_optimizer_state


class RunStateMixin:
    """Checkpoint writing and loading for the trainer (uses its model, optimizer, sampler and position)."""

    def state_dict(self) -> dict | None:
        """The full training state (rank 0; None on the others). Every rank calls it (shards are gathered)."""
        head = full_head_state(self.criterion) if self.sharded_parts else self.criterion.state_dict()
        optim = full_optimizer_state(self.optimizer, self.criterion) if self.sharded_parts else self.optimizer.state_dict()
        if not self.is_main:
            return None
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        pos = self.position
        return {
            "model": self.backbone.state_dict(), "head": head, "config": self.cfg, "step": pos.step, "epoch": pos.epoch,
            "optimizer": optim, "scaler": self.scaler.state_dict(), "position": pos.state_dict(),
            "sampler": self.sampler.state_dict(pos.sample_in_epoch) | {"epoch": pos.epoch},
            "rng": rng, "best_metric": self.best_metric, "num_classes": self.dataset.num_classes,
            "class_names": list(self.source.class_names),
        }

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location="cpu", mmap=True)
        changed = [k for k in diff_configs(ckpt.get("config", {}), self.cfg)
                   if k not in ("train.stop_after", "train.time_limit_min")]
        if changed and self.is_main:
            warnings.warn(f"resuming {path} with a changed config: {', '.join(changed)}", stacklevel=2)
        if ckpt.get("num_classes", self.dataset.num_classes) != self.dataset.num_classes:
            raise ValueError(f"{path} was trained on {ckpt['num_classes']} identities, the data now has "
                             f"{self.dataset.num_classes}; resume needs the same training data")
        self.backbone.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(own_head_state(self.criterion, ckpt["head"]))
        try:
            self.optimizer.load_state_dict(own_optimizer_state(self.optimizer, self.criterion, ckpt["optimizer"]))
        except ValueError as e:
            raise ValueError(f"{path}: its optimizer state does not fit this run's trainable parameters ({e})") from e
        self.scaler.load_state_dict(ckpt["scaler"])
        saved = (RunPosition.from_state(ckpt["position"]) if "position" in ckpt
                 else legacy_position(ckpt, self.sampler.batch_size, self.world_size))
        note = describe_layout_change(saved, self.sampler.layout)
        if note and self.is_main:
            warnings.warn(note, stacklevel=2)
        self.position = replace(saved, layout=self.sampler.layout)
        self.sampler.load_state_dict({**ckpt["sampler"], "epoch": saved.epoch, "start_sample": saved.sample_in_epoch})
        self.best_metric = ckpt.get("best_metric")
        rng = ckpt["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.resumed_from = path

    def _init_weights(self, path: Path) -> None:
        """Warm start: the backbone (and the margin head when its shape fits) from ``path``; nothing else."""
        ckpt = load_checkpoint(path, map_location="cpu", mmap=True)
        try:
            self.backbone.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"init: {path} does not fit {self.cfg['arch']} {self.cfg['backbone_kwargs']} "
                             f"with embedding {self.cfg['embedding_size']}: {e}") from e
        head = ckpt.get("head") or {}
        try:
            mine = own_head_state(self.criterion, head) if head else {}
        except ValueError:
            mine = {}
        if mine and set(mine) == set(self.criterion.state_dict()) and all(
                mine[k].shape == v.shape for k, v in self.criterion.state_dict().items()):
            self.criterion.load_state_dict(mine)
        self.initialised_from = path

    def save(self, name: str = "last.pt") -> Path | None:
        """Write the full training state atomically to ``<out>/<name>``; every rank calls it, rank 0 writes."""
        state = self.state_dict()
        return save_checkpoint(self.out / name, state) if state is not None else None

    def _save_on_error(self) -> None:
        """Keep the state when an error escapes between steps (a consistent state), where one process can."""
        if self._in_step or (self.distributed and self.sharded_parts):
            return  # mid-step, or the head is spread over ranks that may not answer
        try:
            if self.is_main:
                state = self.state_dict()
                if state is not None:
                    save_checkpoint(self.out / "last.pt", state)
        except Exception as save_error:  # pragma: no cover - report, keep the original error
            print(f"could not write the exit checkpoint: {save_error}", file=sys.stderr)

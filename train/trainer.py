"""The recognizer trainer: data → backbone → loss, with exact resume, AMP, DDP, logs and checkpoints.

    trainer = Trainer(load_config("train/configs/smoke.yaml"), resume=False)
    trainer.train()

* Optimiser SGD or AdamW (backbone and loss/head parameter groups, fused kernels where available), cosine
  schedule with linear warm-up and optional warm restarts over the *sample* count (:mod:`train.schedule`),
  AMP (bf16, or fp16 with a GradScaler; off on CPU unless asked), channels_last, gradient clipping (all
  parameters or the backbone only), gradient accumulation, a layer-freezing schedule (:mod:`train.freezing`).
* Under ``torchrun`` (WORLD_SIZE > 1): DDP over the backbone and the loss parts that are small; the margin
  head is split over the ranks outside DDP (:mod:`train.sharded_head`, ``loss.sharded``). The trainable set
  is fixed before DDP is built and the trainer checks that DDP registered exactly what the optimizer
  updates. At the end every rank holds the same model (BN statistics broadcast from rank 0).
* The host waits for the device only every ``train.log_every`` steps: losses, gradient norms and
  non-finite flags stay on the device in between; a step with a non-finite loss or gradient (on any rank)
  is skipped on the device (:func:`train.optim.step_unless`) and reported at the next log row;
  :data:`MAX_NONFINITE_STEPS` in a row stop the run with FloatingPointError (:mod:`train.stop`: with
  several processes, signals and time limits are agreed on at log rows).
* ``<out>/last.pt`` is written atomically every ``train.checkpoint_every`` steps, at the end, on SIGINT /
  SIGTERM (at the next step boundary; with several processes the next log row) and when an exception escapes between steps (single process, or several
  without a sharded head). It holds the model, the full head (shards reassembled), optimizer, scaler, the
  run's position in global samples and python/numpy/torch RNG states, so a resumed run continues exactly
  (bit-identical on CPU with the same thread count), also on another number of processes (same samples,
  same learning-rate curve).
* Periodic verification on one or more pair sets keeps ``<out>/best.pt`` (best mean accuracy);
  ``<out>/log.csv``, TensorBoard scalars under ``<out>/tb`` and a tqdm bar report progress.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from evaluation.verification import mean_verification, quick_verify
from runtime.files import remove_stale_temporaries
from runtime.preprocess import RECOGNIZER_SPEC, to_model_input

from . import distributed as dd
from .backbones import build_backbone
from .checkpoint import save_checkpoint
from .config import expand_path, output_dir, save_config
from .datasets import FaceDataset, source_from_config
from .device_input import DeviceNormalizer
from .evaluate import load_eval_sets
from .freezing import FreezeSchedule
from .loader import build_loader, next_step_batches
from .losses import MARGIN_HEADS, WeightedLoss, build_loss
from .optim import build_optimizer, clip_to, grad_sq_norm, step_unless
from .samplers import PKBatchSampler, ShuffleBatchSampler
from .schedule import RunPosition, WarmupCosine
from .stop import StopControl
from .run_state import RunStateMixin
from .sharded_head import ShardedMarginLoss, sharded_builder
from .trainlog import CSVLog, Window, eval_columns, log_columns, write_tensorboard

MAX_NONFINITE_STEPS = 20
__all__ = ["Trainer", "TrainModule", "WarmupCosine", "resolve_amp", "MAX_NONFINITE_STEPS"]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). ``auto``: bf16 on CUDA GPUs that support it, fp16 on older ones,
    off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class TrainModule(nn.Module):
    """What DDP wraps: the backbone and the loss parts computed on each rank's own rows.
    ``forward(images, labels, teacher) -> (embeddings, local loss or None, {part: value})``."""

    def __init__(self, backbone: nn.Module, local_loss: WeightedLoss | None):
        super().__init__()
        self.backbone, self.criterion = backbone, local_loss

    def forward(self, images, labels, teacher=None):
        emb = self.backbone(images)
        if self.criterion is None:
            return emb, None, {}
        loss, parts = self.criterion(emb, labels, teacher)
        return emb, loss, parts


class Trainer(RunStateMixin):
    """One training run (see the module docstring). ``callbacks`` are called as ``fn(trainer)`` after each step."""

    def __init__(self, cfg: dict, resume: bool | str | Path = False, overwrite: bool = False,
                 callbacks: list[Callable[["Trainer"], None]] | None = None):
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.out = output_dir(cfg)
        self._in_step = False
        self.stop = StopControl()
        self.stop.install()  # a SIGTERM during set-up stops before the first step
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.stop.restore()
            raise

    def _setup(self, resume, overwrite: bool) -> None:
        cfg, t = self.cfg, self.cfg["train"]
        self.dist = dd.init_distributed(t["device"])
        self.device, self.rank, self.world_size = self.dist.device, self.dist.rank, self.dist.world_size
        self.distributed, self.is_main = self.dist.distributed, self.dist.is_main
        if t["threads"]:
            torch.set_num_threads(int(t["threads"]))
        if t["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        resume_path = self._resume_path(resume, overwrite)
        self._seed_everything(cfg["seed"])
        self._build_data()
        self._build_model()
        self._build_optim()
        self.position = RunPosition(ref_global_batch=self.global_batch, layout=self.sampler.layout)
        self.best_metric, self.initialised_from = None, None
        if resume_path is not None:
            self._load(resume_path)
        elif cfg["init"]:
            self._init_weights(expand_path(cfg["init"]))
        self._build_schedule()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in ("last.pt", "best.pt"):  # temp files of writers killed mid-checkpoint
                remove_stale_temporaries(self.out / name)
            save_config(cfg, self.out / "config.yaml")

    step = property(lambda self: self.position.step, doc="Optimizer steps taken (all invocations of the run).")
    epoch = property(lambda self: self.position.epoch, doc="The epoch the next step belongs to (0-based).")

    # ------------------------------------------------------------------------------------------- set-up
    def _resume_path(self, resume, overwrite: bool) -> Path | None:
        if resume:
            p = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else self.out
            p = p / "last.pt" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {p}")
            return p
        if (self.out / "last.pt").exists() and not overwrite:
            raise FileExistsError(f"{self.out} already holds a run (last.pt); pass --resume to continue it, "
                                  f"--overwrite to start again, or set output=<another folder>")
        return None

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_data(self) -> None:
        d, t = self.cfg["data"], self.cfg["train"]
        progress = t["progress"] and self.is_main
        self.source = source_from_config(d, progress)
        self.dataset = FaceDataset(self.source, d["augment"], RECOGNIZER_SPEC, d["cache"], expand_path(d["teacher"]),
                                   threads=max(1, d["workers"]), progress=progress, output=d["transfer"],
                                   processes=self.dist.local_world_size, data_format=d["format"])
        self.accumulate = int(t["accumulate"])
        args = (self.cfg["seed"], self.rank, self.world_size, self.accumulate)
        if d["sampler"] == "pk":
            self.sampler = PKBatchSampler(self.dataset.labels, d["pk_p"], d["pk_k"], *args)
        else:
            self.sampler = ShuffleBatchSampler(len(self.dataset), d["batch_size"], *args)
        self.global_batch = self.sampler.global_batch
        self.loader = build_loader(self.dataset, self.sampler, d, self.device, self.cfg["seed"])
        self.channels_last = bool(t["channels_last"])
        self.normalizer = DeviceNormalizer(RECOGNIZER_SPEC, "BGR", self.device, self.channels_last)
        e = self.cfg["eval"]
        self.eval_sets = load_eval_sets(e, expand_path) if e["format"] != "none" and self.is_main else []

    def _sharded(self) -> bool:
        mode, head = self.cfg["loss"]["sharded"], str(self.cfg["loss"]["head"])
        return mode is True or (mode == "auto" and self.distributed and head in MARGIN_HEADS)

    def _build_model(self) -> None:
        cfg = self.cfg
        self.backbone = build_backbone(cfg["arch"], cfg["embedding_size"], **cfg["backbone_kwargs"])
        builder = sharded_builder(self.rank, self.world_size, cfg["seed"]) if self._sharded() else None
        self.criterion = build_loss(_loss_config(cfg, self.dataset.teacher_dim), self.dataset.num_classes,
                                    cfg["embedding_size"], classification=builder)
        self.backbone.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.criterion.to(self.device)
        self.sharded_parts = {n: m for n, m in self.criterion.parts.items() if isinstance(m, ShardedMarginLoss)}
        local = {n: (self.criterion.weights[n], m) for n, m in self.criterion.parts.items() if n not in self.sharded_parts}
        self.module = TrainModule(self.backbone, WeightedLoss(local) if local else None)
        self.freeze = FreezeSchedule([(list(f["modules"]), int(f["until_step"])) for f in cfg["schedule"]["freeze"] or []],
                                     self.backbone)
        self.ddp = None
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.amp_dtype = resolve_amp(cfg["train"]["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_optim(self) -> None:
        o = self.cfg["optim"]
        self.backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.shard_params = [m.head.weight for m in self.sharded_parts.values()]
        self.head_params = [p for p in self.criterion.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(o, self.backbone_params, self.head_params)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.ddp is not None:
            dd.check_ddp_registration(self.ddp, self.optimizer, outside=self.shard_params)

    def _build_schedule(self) -> None:
        """Lengths in schedule steps (of the run's reference global batch) and the learning rate now."""
        s, ref = self.cfg["schedule"], self.position.ref_global_batch
        per_epoch = len(self.sampler.epoch_samples(0)[0]) // ref
        total = int(math.ceil(s["epochs"] * per_epoch)) if s["epochs"] > 0 else int(s["steps"])
        warmup = int(s["warmup_epochs"] * per_epoch) if s["warmup_epochs"] > 0 else int(s["warmup_steps"])
        self.lr_lambda = WarmupCosine(total, warmup, s["min_lr_ratio"], s["restarts"], s["restart_mult"])
        self.total_samples = total * ref
        left = max(0, self.total_samples - self.position.samples_seen)
        self.total_steps = self.position.step + -(-left // self.global_batch)
        self._set_lr()

    def _set_lr(self) -> None:
        factor = self.lr_lambda(self.position.schedule_step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor

    # ------------------------------------------------------------------------------------------- steps
    def _forward(self, batch: dict, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch["image"].dtype == torch.uint8:
            images = self.normalizer(batch["image"])
        else:
            images = batch["image"].to(self.device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        labels = batch["label"].to(self.device, non_blocking=True)
        teacher = batch["teacher"].to(self.device, non_blocking=True) if "teacher" in batch else None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            emb, loss, parts = (self.ddp or self.module)(images, labels, teacher)
        for name, part in self.sharded_parts.items():
            value = part(emb, labels, sample_seed=self.position.step * self.accumulate + micro)
            term = self.criterion.weights[name] * value
            loss = term if loss is None else loss + term
            parts = {**parts, name: value.detach()}
        return loss, {k: parts[k] for k in self.criterion.parts}

    def _train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accumulate`` micro-batches → device tensors (loss, parts, skipped, grad norm)."""
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (logged)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total, parts_sum, bad = None, {}, torch.zeros((), device=self.device)
        for j, batch in enumerate(micro_batches):
            with self.ddp.no_sync() if self.ddp is not None and j < n - 1 else nullcontext():
                loss, parts = self._forward(batch, j)
                self.scaler.scale(loss / n).backward()
            loss = loss.detach().float()
            bad = bad + (~torch.isfinite(loss)).float()
            total = loss / n if total is None else total + loss / n
            parts_sum = {k: parts_sum.get(k, 0) + v.float() / n for k, v in parts.items()}
        self.last_indices = torch.cat([b["index"] for b in micro_batches])
        self.freeze.drop_frozen_grads(self.position.schedule_step)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        found_inf, grad_norm = self._check_and_clip(bad)
        step_unless(self.optimizer, found_inf, self.scaler)
        self.scaler.update()
        self.position.advance(self.global_batch)
        self._set_lr()
        return total, parts_sum, found_inf, grad_norm

    def _check_and_clip(self, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Skip flag (the same on every rank) and the gradient norm; clips as ``optim`` says. No host wait."""
        in_ddp = [p for p in self.head_params if all(p is not q for q in self.shard_params)]
        sq_backbone, sq_local = grad_sq_norm(self.backbone_params, self.device), grad_sq_norm(in_ddp, self.device)
        shared = torch.stack([bad, grad_sq_norm(self.shard_params, self.device)])
        dd.all_reduce_sum_(shared)  # non-finite losses on any rank; shards' squared norms
        sq_total = sq_backbone + sq_local + shared[1]
        found_inf = ((shared[0] > 0) | ~torch.isfinite(sq_total)).float()
        o = self.cfg["optim"]
        if o["grad_clip"] > 0:
            if o["grad_clip_params"] == "backbone":
                clip_to(self.backbone_params, o["grad_clip"], sq_backbone.sqrt())
            else:
                clip_to(self.backbone_params + self.head_params, o["grad_clip"], sq_total.sqrt())
        return found_inf, sq_total.sqrt()

    # ------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Raw embeddings of uint8 BGR crops (N×112×112×3) with the current backbone (eval mode)."""
        was = self.backbone.training
        self.backbone.eval()
        x = torch.from_numpy(to_model_input(crops, RECOGNIZER_SPEC, color_order="BGR")).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = self.backbone(x)
        self.backbone.train(was)
        return out.float().cpu().numpy()

    def evaluate(self) -> dict | None:
        """Verify on every configured pair set; keeps ``best.pt`` when their mean accuracy improves."""
        if not self.eval_sets:
            return None
        bs = self.cfg["eval"]["batch_size"]
        r = mean_verification({name: quick_verify(self.embed, crops, ps.pairs, ps.issame, bs)
                               for name, ps, crops in self.eval_sets})
        if self.best_metric is None or r["accuracy"] > self.best_metric:
            self.best_metric = r["accuracy"]
            save_checkpoint(self.out / "best.pt", {"model": self.backbone.state_dict(), "config": self.cfg,
                                                   "step": self.step, "best_metric": self.best_metric, "eval": r})
        return r

    def _eval_main(self) -> dict | None:
        r = self.evaluate() if self.is_main else None
        dd.barrier()
        return r

    # ------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run until ``schedule`` is done (or a stop condition); returns a summary dict."""
        self.stop.install()
        try:
            return self._loop()
        finally:
            self.stop.restore()

    def _done(self) -> bool:
        return self.position.samples_seen >= self.total_samples

    def _final_eval(self, log: CSVLog | None) -> None:
        """The evaluation at the end of training (on every rank: it is a barrier), logged by the main one."""
        ev = self._eval_main()
        if ev and log:
            log.write({"step": self.step, "epoch": self.epoch, **eval_columns(ev)})
        self.last_row.update(eval_columns(ev))

    def _loop(self) -> dict:
        cfg, t = self.cfg, self.cfg["train"]
        self.part_names = list(self.criterion.parts)
        columns = log_columns(self.part_names, [n for n, _, _ in self.eval_sets])
        log = CSVLog(self.out / "log.csv", columns, self.step) if self.is_main else None
        tb = self._tensorboard() if self.is_main else None
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg["name"], unit="step", dynamic_ncols=True,
                   disable=not (t["progress"] and self.is_main), mininterval=1.0)
        self.stop.start(self.step)
        self._t0 = time.time()
        self._window, last_eval, self.last_row = Window(self.device), None, {}
        self.module.train()
        try:
            while not self._done() and self.stop.reason is None:
                pos = self.position
                if not self.sampler.steps(pos.epoch):
                    raise RuntimeError(f"epoch {pos.epoch} has no batch: too few samples/identities for one batch")
                self.sampler.set_epoch(pos.epoch, pos.sample_in_epoch)
                it = iter(self.loader)
                while True:
                    micro, wait = next_step_batches(it, self.accumulate)
                    if micro is None:
                        self.position.next_epoch()
                        break
                    self._in_step = True
                    loss, parts, found_inf, grad_norm = self._train_step(micro)
                    self._in_step = False
                    self._window.add(loss, parts, found_inf, grad_norm, len(self.last_indices) * self.world_size, wait)
                    ev = None
                    if cfg["eval"]["every"] and self.step % cfg["eval"]["every"] == 0:
                        ev, last_eval = self._eval_main(), self.step
                    at_row = self.step % t["log_every"] == 0 or self._done() or ev is not None
                    if at_row:
                        self._log_row(log, tb, ev, bar)
                    bar.update(1)
                    if t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0 and not self._done():
                        self.save()
                    for cb in self.callbacks:
                        cb(self)
                    if self._done() or self.stop.should_stop(self.step, t, at_row, self.distributed, self.device):
                        break
            if self._done() and cfg["eval"]["format"] != "none" and last_eval != self.step:
                self._final_eval(log)
            if self._done():
                dd.broadcast_buffers(self.backbone)
            self.save()
        except BaseException:
            self._save_on_error()
            raise
        finally:
            bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        return {"step": self.step, "total_steps": self.total_steps, "output": str(self.out),
                "stopped": self.stop.reason, "best_metric": self.best_metric, "last": self.last_row}

    def _log_row(self, log, tb, ev: dict | None, bar) -> None:
        """Read the window's statistics from the device (the one synchronisation), report non-finite steps."""
        now = time.time()
        stats, run = self._window.read(now, self.part_names)
        self.last_row = {"step": self.step, "epoch": self.epoch, "lr": self.lr, **stats,
                         "elapsed_s": now - self._t0, **eval_columns(ev)}
        self._window.reset(now)
        if stats["nonfinite_steps"] and self.is_main:
            warnings.warn(f"step {self.step}: {stats['nonfinite_steps']} step(s) since the last log row had a "
                          f"non-finite loss or gradient; their updates were skipped", stacklevel=3)
        if run >= MAX_NONFINITE_STEPS:
            raise FloatingPointError(f"{run} non-finite losses in a row at step {self.step}; "
                                     f"lower optim.lr or enable optim.grad_clip")
        if log:
            log.write(self.last_row)
        if tb:
            write_tensorboard(tb, self.last_row, self.step)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{self.lr:.3g}", img_s=f"{stats['images_per_s']:.0f}")

    def _tensorboard(self):
        if not self.cfg["train"]["tensorboard"]:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: CSV only
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)


def _loss_config(cfg: dict, teacher_dim: int) -> dict:
    """The ``loss`` section as :func:`train.losses.build_loss` takes it (nulls dropped, teacher size filled in)."""
    loss = {k: v for k, v in cfg["loss"].items() if v is not None and v is not False}
    if loss.get("distill"):
        d = {} if loss["distill"] is True else dict(loss["distill"])
        d.setdefault("teacher_dim", teacher_dim)
        loss["distill"] = d
    return loss

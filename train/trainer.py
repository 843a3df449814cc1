"""The recognizer trainer: data → backbone → loss, with exact resume, AMP, DDP, logs and checkpoints.

    trainer = Trainer(load_config("train/configs/smoke.yaml"), resume=False)
    trainer.train()

* Optimiser SGD or AdamW (backbone and loss/head parameter groups), cosine schedule with linear warm-up
  and optional warm restarts, AMP (bf16, or fp16 with a GradScaler; off on CPU unless asked),
  channels_last, gradient clipping, a layer-freezing schedule.
* DDP when started by ``torchrun`` with WORLD_SIZE > 1; a single process never creates a process group.
* ``<out>/last.pt`` is written atomically every ``train.checkpoint_every`` steps, at the end, on SIGINT /
  SIGTERM (at the next step boundary) and when an exception escapes between steps. It holds the model,
  head, optimizer, scheduler, scaler, sampler position and python/numpy/torch RNG states, so a resumed run
  continues exactly (bit-identical on CPU with the same thread count).
* Periodic verification on a pair set keeps ``<out>/best.pt``; ``<out>/log.csv``, TensorBoard scalars
  under ``<out>/tb`` and a tqdm bar report progress.
"""
from __future__ import annotations

import csv
import io
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from evaluation.verification import quick_verify
from runtime.files import atomic_write_bytes, remove_stale_temporaries
from runtime.preprocess import RECOGNIZER_SPEC, to_model_input

from .backbones import build_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .config import diff_configs, expand_path, output_dir, save_config
from .datasets import DataError, FaceDataset, source_from_config, worker_init
from .evaluate import load_eval_set
from .losses import build_loss
from .samplers import PKBatchSampler, ShuffleBatchSampler

MAX_NONFINITE_STEPS = 20


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). ``auto``: bf16 on CUDA GPUs that support it, fp16 on older ones,
    off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class WarmupCosine:
    """LR factor at step k: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` in
    ``restarts + 1`` cycles (each ``mult`` times longer than the previous; SGDR warm restarts)."""

    def __init__(self, total: int, warmup: int = 0, min_ratio: float = 0.0, restarts: int = 0, mult: float = 1.0):
        self.total, self.warmup, self.min_ratio = int(total), int(min(warmup, total)), float(min_ratio)
        self.restarts, self.mult = int(restarts), float(mult)

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        rest = max(1, self.total - self.warmup)
        lengths = [self.mult ** i for i in range(self.restarts + 1)]
        pos = (k - self.warmup) / rest * sum(lengths)
        if pos >= sum(lengths):
            return self.min_ratio
        for length in lengths:
            if pos < length:
                break
            pos -= length
        frac = min(pos / length, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


class TrainModule(nn.Module):
    """Backbone + loss in one module (what DDP wraps): ``forward(images, labels, teacher) -> (loss, parts)``."""

    def __init__(self, backbone: nn.Module, criterion: nn.Module):
        super().__init__()
        self.backbone, self.criterion = backbone, criterion

    def forward(self, images, labels, teacher=None):
        return self.criterion(self.backbone(images), labels, teacher)


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


def _loss_config(cfg: dict, teacher_dim: int) -> dict:
    """The ``loss`` section as :func:`train.losses.build_loss` takes it (nulls dropped, teacher size filled in)."""
    loss = {k: v for k, v in cfg["loss"].items() if v is not None and v is not False}
    if loss.get("distill"):
        d = {} if loss["distill"] is True else dict(loss["distill"])
        d.setdefault("teacher_dim", teacher_dim)
        loss["distill"] = d
    return loss


class Trainer:
    """One training run (see the module docstring). ``callbacks`` are called as ``fn(trainer)`` after each step."""

    def __init__(self, cfg: dict, resume: bool | str | Path = False, overwrite: bool = False,
                 callbacks: list[Callable[["Trainer"], None]] | None = None):
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.out = output_dir(cfg)
        self._stop_reason: str | None = None
        self._in_step = False
        self._handlers = self._install_signal_handlers()  # a SIGTERM during set-up stops before the first step
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _setup(self, resume, overwrite: bool) -> None:
        cfg = self.cfg
        self._setup_distributed()
        t = cfg["train"]
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
        self.step, self.epoch, self.batch_in_epoch, self.best_metric = 0, 0, 0, None
        self.initialised_from: Path | None = None
        if resume_path is not None:
            self._load(resume_path)
        elif cfg["init"]:
            self._init_weights(expand_path(cfg["init"]))
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in ("last.pt", "best.pt"):  # temp files of writers killed mid-checkpoint
                remove_stale_temporaries(self.out / name)
            save_config(cfg, self.out / "config.yaml")

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world_size > 1
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(self.cfg["train"]["device"], local_rank)
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        else:
            self.rank = 0
        self.is_main = self.rank == 0

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
        d = self.cfg["data"]
        progress = self.cfg["train"]["progress"] and self.is_main
        self.source = source_from_config(d, progress)
        self.dataset = FaceDataset(self.source, d["augment"], RECOGNIZER_SPEC, d["cache"],
                                   expand_path(d["teacher"]), threads=max(1, d["workers"]), progress=progress)
        if d["sampler"] == "pk":
            self.sampler = PKBatchSampler(self.dataset.labels, d["pk_p"], d["pk_k"], self.cfg["seed"],
                                          self.rank, self.world_size)
        else:
            self.sampler = ShuffleBatchSampler(len(self.dataset), d["batch_size"], self.cfg["seed"],
                                               self.rank, self.world_size)
        workers = int(d["workers"])
        pin = d["pin_memory"]
        pin = self.device.type == "cuda" if pin == "auto" else bool(pin)
        kw = {}
        if workers > 0:
            kw = dict(persistent_workers=bool(d["persistent_workers"]), prefetch_factor=int(d["prefetch_factor"]),
                      worker_init_fn=worker_init)
            if sys.platform.startswith("linux"):
                kw["multiprocessing_context"] = "fork"  # workers share the decoded cache copy-on-write
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin,
            generator=torch.Generator().manual_seed(self.cfg["seed"]), **kw)
        s = self.cfg["schedule"]
        per_epoch = self.sampler.batches_per_epoch()
        self.total_steps = int(math.ceil(s["epochs"] * per_epoch)) if s["epochs"] > 0 else int(s["steps"])
        self.warmup_steps = int(s["warmup_epochs"] * per_epoch) if s["warmup_epochs"] > 0 else int(s["warmup_steps"])
        self.eval_set = None
        e = self.cfg["eval"]
        if e["format"] != "none" and self.is_main:
            try:
                self.eval_set = load_eval_set(e["format"], expand_path(e["path"]),
                                              expand_path(e["pairs"]), e["max_pairs"])
            except DataError as err:
                if not e["optional"]:
                    raise
                warnings.warn(f"evaluation skipped: {err}", stacklevel=2)

    def _build_model(self) -> None:
        cfg = self.cfg
        self.backbone = build_backbone(cfg["arch"], cfg["embedding_size"], **cfg["backbone_kwargs"])
        self.criterion = build_loss(_loss_config(cfg, self.dataset.teacher_dim), self.dataset.num_classes,
                                    cfg["embedding_size"])
        self.channels_last = bool(cfg["train"]["channels_last"])
        self.backbone.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.criterion.to(self.device)
        self.module = TrainModule(self.backbone, self.criterion)
        self.freeze_rules = [(list(f["modules"]), int(f["until_step"])) for f in cfg["schedule"]["freeze"] or []]
        names = [n for n, _ in self.backbone.named_parameters()]
        for prefixes, _ in self.freeze_rules:
            for p in prefixes:
                if not any(n == p or n.startswith(p + ".") for n in names):
                    raise ValueError(f"schedule.freeze: no backbone parameter under {p!r} "
                                     f"(e.g. {', '.join(sorted({n.split('.')[0] for n in names})[:8])})")
        self._frozen: frozenset[str] | None = None
        self.ddp = None
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=bool(self.freeze_rules))
        self.amp_dtype = resolve_amp(cfg["train"]["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_optim(self) -> None:
        o = self.cfg["optim"]
        head_wd = o["weight_decay"] if o["head_weight_decay"] is None else o["head_weight_decay"]
        groups = [
            {"params": list(self.backbone.parameters()), "lr": o["lr"], "weight_decay": o["weight_decay"], "name": "backbone"},
            {"params": list(self.criterion.parameters()), "lr": o["lr"] * o["head_lr_mult"], "weight_decay": head_wd,
             "name": "head"},
        ]
        groups = [g for g in groups if g["params"]]
        if o["name"] == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"])
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
        self.lr_lambda = self._schedule_from_config()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)

    def _schedule_from_config(self) -> WarmupCosine:
        s = self.cfg["schedule"]
        return WarmupCosine(self.total_steps, self.warmup_steps, s["min_lr_ratio"], s["restarts"], s["restart_mult"])

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.backbone.state_dict(), "head": self.criterion.state_dict(), "config": self.cfg,
            "step": self.step, "epoch": self.epoch, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(self.batch_in_epoch) | {"epoch": self.epoch},
            "rng": rng, "best_metric": self.best_metric, "num_classes": self.dataset.num_classes,
            "class_names": list(self.source.class_names),
        }

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        changed = [k for k in diff_configs(ckpt.get("config", {}), self.cfg) if k not in ("train.stop_after",
                                                                                         "train.time_limit_min")]
        if changed and self.is_main:
            warnings.warn(f"resuming {path} with a changed config: {', '.join(changed)}", stacklevel=2)
        if ckpt.get("num_classes", self.dataset.num_classes) != self.dataset.num_classes:
            raise ValueError(f"{path} was trained on {ckpt['num_classes']} identities, the data now has "
                             f"{self.dataset.num_classes}; resume needs the same training data")
        self.backbone.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # the schedule follows the current config (e.g. more steps), the position follows the checkpoint;
        # a new object, because LambdaLR.load_state_dict wrote the old run's settings into the one it held
        self.lr_lambda = self._schedule_from_config()
        self.scheduler.lr_lambdas = [self.lr_lambda] * len(self.optimizer.param_groups)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["sampler"]["epoch"])
        self.batch_in_epoch = int(ckpt["sampler"]["start_batch"])
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
        ckpt = load_checkpoint(path, map_location=self.device)
        try:
            self.backbone.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"init: {path} does not fit {self.cfg['arch']} {self.cfg['backbone_kwargs']} "
                             f"with embedding {self.cfg['embedding_size']}: {e}") from e
        head = ckpt.get("head") or {}
        mine = self.criterion.state_dict()
        if head and set(head) == set(mine) and all(head[k].shape == mine[k].shape for k in mine):
            self.criterion.load_state_dict(head)
        self.initialised_from = path

    def save(self, name: str = "last.pt") -> Path | None:
        """Write the full training state atomically to ``<out>/<name>`` (main process only)."""
        if not self.is_main:
            return None
        return save_checkpoint(self.out / name, self.state_dict())

    # ------------------------------------------------------------------------------------------- steps
    def _apply_freeze(self) -> None:
        frozen = frozenset(p for prefixes, until in self.freeze_rules if self.step < until for p in prefixes)
        if frozen == self._frozen:
            return
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(not any(n == f or n.startswith(f + ".") for f in frozen))
        self._frozen = frozen

    def _any(self, flag: bool) -> bool:
        """True when ``flag`` is set on any process."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _train_step(self, batch: dict) -> tuple[float, dict[str, float], bool]:
        images = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"].to(self.device, non_blocking=True)
        teacher = batch["teacher"].to(self.device, non_blocking=True) if "teacher" in batch else None
        model = self.ddp or self.module
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (logged)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss, parts = model(images, labels, teacher)
        bad = self._any(not bool(torch.isfinite(loss)))
        if bad:
            self.scheduler.step()
            return float(loss.detach()), {k: float(v) for k, v in parts.items()}, False
        self.scaler.scale(loss).backward()
        clip = self.cfg["optim"]["grad_clip"]
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler may skip optimizer.step() on overflow; that is fine
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        return float(loss.detach()), {k: float(v) for k, v in parts.items()}, True

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
        """Verify on the configured pair set; keeps ``best.pt`` when accuracy improves."""
        if self.eval_set is None:
            return None
        pairset, crops = self.eval_set
        r = quick_verify(self.embed, crops, pairset.pairs, pairset.issame, self.cfg["eval"]["batch_size"])
        if self.best_metric is None or r["accuracy"] > self.best_metric:
            self.best_metric = r["accuracy"]
            save_checkpoint(self.out / "best.pt", {"model": self.backbone.state_dict(), "config": self.cfg,
                                                   "step": self.step, "best_metric": self.best_metric, "eval": r})
        return r

    # ------------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, _frame) -> None:
        if self._stop_reason is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_reason = signal.Signals(signum).name

    def _install_signal_handlers(self) -> dict:
        if not threading_is_main():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._handlers.items():
            signal.signal(sig, old)
        self._handlers = {}

    def train(self) -> dict:
        """Run until ``schedule`` is done (or a stop condition); returns a summary dict."""
        if not self._handlers:
            self._handlers = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            self._restore_signal_handlers()

    def _loop(self) -> dict:
        cfg, t = self.cfg, self.cfg["train"]
        part_names = list(self.criterion.parts.keys()) if hasattr(self.criterion, "parts") else []
        columns = (["step", "epoch", "loss", "lr"] + [f"loss_{p}" for p in part_names]
                   + ["images_per_s", "data_wait", "elapsed_s", "eval_accuracy", "eval_threshold_cosine",
                      "eval_cos_same", "eval_cos_diff"])
        log = CSVLog(self.out / "log.csv", columns, self.step) if self.is_main else None
        tb = self._tensorboard() if self.is_main else None
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg["name"], unit="step", dynamic_ncols=True,
                   disable=not (t["progress"] and self.is_main), mininterval=1.0)
        start_step, t0 = self.step, time.time()
        win_t, win_imgs, win_wait = time.time(), 0, 0.0
        sums: dict[str, float] = {}
        n_sum, nonfinite, last_eval = 0, 0, None
        self.module.train()
        last_row: dict = {}
        try:
            while self.step < self.total_steps and self._stop_reason is None:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                it = iter(self.loader)
                exhausted = False
                while True:
                    tw = time.time()
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    win_wait += time.time() - tw
                    self._apply_freeze()
                    self._in_step = True
                    loss, parts, ok = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._in_step = False
                    if not ok:
                        nonfinite += 1
                        warnings.warn(f"step {self.step}: non-finite loss {loss}; step skipped", stacklevel=2)
                        if nonfinite >= MAX_NONFINITE_STEPS:
                            raise FloatingPointError(f"{nonfinite} non-finite losses in a row at step {self.step}; "
                                                     f"lower optim.lr or enable optim.grad_clip")
                        loss, parts = float("nan"), {}
                    else:
                        nonfinite = 0
                    win_imgs += len(batch["label"]) * self.world_size
                    if ok:
                        sums["loss"] = sums.get("loss", 0.0) + loss
                        for k, v in parts.items():
                            sums[k] = sums.get(k, 0.0) + v
                        n_sum += 1
                    ev = None
                    if cfg["eval"]["every"] and self.step % cfg["eval"]["every"] == 0:
                        ev = self._eval_main()
                        last_eval = self.step
                    if self.step % t["log_every"] == 0 or self.step == self.total_steps or ev:
                        now = time.time()
                        k_n = max(n_sum, 1)
                        last_row = {"step": self.step, "epoch": self.epoch, "loss": sums.get("loss", float("nan")) / k_n,
                                    "lr": self.lr,
                                    **{f"loss_{k}": sums.get(k, float("nan")) / k_n for k in part_names},
                                    "images_per_s": win_imgs / max(now - win_t, 1e-9),
                                    "data_wait": win_wait / max(now - win_t, 1e-9),
                                    "elapsed_s": now - t0, **self._eval_cols(ev)}
                        if log:
                            log.write(last_row)
                        if tb:
                            for k, v in last_row.items():
                                if k not in ("step", "epoch") and isinstance(v, float) and math.isfinite(v):
                                    tb.add_scalar(k.replace("eval_", "eval/").replace("loss_", "loss/"), v, self.step)
                        bar.set_postfix(loss=f"{last_row['loss']:.3f}", lr=f"{last_row['lr']:.3g}",
                                        img_s=f"{last_row['images_per_s']:.0f}")
                        win_t, win_imgs, win_wait, sums, n_sum = now, 0, 0.0, {}, 0
                    bar.update(1)
                    if t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0 and self.step < self.total_steps:
                        self.save()
                    for cb in self.callbacks:
                        cb(self)
                    if self.step >= self.total_steps or self._should_stop(start_step, t0):
                        break
                if exhausted:
                    if not self.sampler.batches(self.epoch):
                        raise RuntimeError(f"epoch {self.epoch} has no batch: too few samples/identities for one batch")
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.step >= self.total_steps and self.eval_set is not None and last_eval != self.step:
                ev = self._eval_main()
                if ev and log:
                    log.write({"step": self.step, "epoch": self.epoch, **self._eval_cols(ev)})
                last_row.update(self._eval_cols(ev))
            self.save()
        except BaseException:
            if not self._in_step:  # state is consistent between steps: keep it
                try:
                    self.save()
                except Exception as save_error:  # pragma: no cover - report, keep the original error
                    print(f"could not write the exit checkpoint: {save_error}", file=sys.stderr)
            raise
        finally:
            bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        return {"step": self.step, "total_steps": self.total_steps, "output": str(self.out),
                "stopped": self._stop_reason, "best_metric": self.best_metric, "last": last_row}

    def _should_stop(self, start_step: int, t0: float) -> bool:
        t = self.cfg["train"]
        if t["stop_after"] and self.step - start_step >= t["stop_after"] and self._stop_reason is None:
            self._stop_reason = "stop_after"
        if t["time_limit_min"] and time.time() - t0 >= 60 * t["time_limit_min"] and self._stop_reason is None:
            self._stop_reason = "time_limit"
        return self._any(self._stop_reason is not None)

    def _eval_main(self) -> dict | None:
        r = self.evaluate() if self.is_main else None
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return r

    @staticmethod
    def _eval_cols(ev: dict | None) -> dict:
        if not ev:
            return {}
        return {"eval_accuracy": ev["accuracy"], "eval_threshold_cosine": ev["threshold_cosine"],
                "eval_cos_same": ev["cos_same"], "eval_cos_diff": ev["cos_diff"]}

    def _tensorboard(self):
        if not self.cfg["train"]["tensorboard"]:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: CSV only
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step or None)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

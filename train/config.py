"""Experiment configs: YAML files over built-in defaults, dotted command-line overrides, validation.

    cfg = load_config("train/configs/smoke.yaml", ["optim.lr=0.05", "data.batch_size=32"])
    cfg = load_config("train/configs/aligner_300w.yaml")  # task: landmarks -> the aligner's schema

Each task has a :class:`Schema` (its keys with their defaults, the allowed choices, the free-form keys and
the checks across keys): :data:`DEFAULTS` for ``task: recognition`` (the default), :data:`ALIGNER_DEFAULTS`
for ``task: landmarks``; the file's ``task`` picks it. Unknown keys and wrong types are errors that name
the key (and suggest the closest known one). The resolved config is saved as ``<output>/config.yaml`` and
inside every checkpoint; its top level carries ``task``, ``arch`` and the model's own keys as
:mod:`train.checkpoint` expects.
Paths may use ``$FACEKIT_DATA`` (default ``../shared/data`` next to the repository) and ``~``.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from evaluation.data import data_root
from runtime.files import atomic_write_bytes, existing_file
from runtime.landmarks import AlignerGeometry

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Every key a config may have, with its default. ``None`` defaults accept a string (paths) or null.
DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "task": "recognition",
    "arch": "mobilefacenet",
    "embedding_size": 512,
    "backbone_kwargs": {},
    "seed": 0,
    "output": None,  # default runs/<name>
    "init": None,  # checkpoint whose weights start this run (fresh optimizer and schedule); ignored on --resume
    "data": {
        "format": "list",  # folder | list | rec | synthetic
        "root": None,  # folder tree root, or the root list-file paths are relative to
        "list": None,  # list file (`path identity` lines); relative paths resolve against root
        "rec": None,  # insightface train.rec (train.idx next to it unless `idx` is given)
        "idx": None,
        "synthetic": {"identities": 100, "per_identity": 12, "seed": 0},
        "fallback_synthetic": False,  # use synthetic data when the configured files are absent
        "min_per_identity": 1,
        "max_identities": 0,
        "max_per_identity": 0,
        "augment": "flip",  # preset name or list of ops (see train/augment.py)
        "cache": "auto",  # auto (none for rec, else decoded when it fits) | decoded | encoded | none
        "transfer": "uint8",  # uint8: workers ship crops, the device normalises; float32: workers normalise
        "teacher": None,  # npz with paths, emb, emb_flip (distillation)
        "batch_size": 128,  # per process (global batch = batch_size × processes × train.accumulate)
        "sampler": "shuffle",  # shuffle | pk
        "pk_p": 32,
        "pk_k": 4,
        "workers": 4,
        "prefetch_factor": 4,
        "pin_memory": "auto",  # auto (on with CUDA) | true | false
        "persistent_workers": True,
    },
    "loss": {  # passed to train.losses.build_loss (see its docstring)
        "head": "arcface",  # arcface | cosface | combined | softmax | none
        "s": 64.0,
        "m": None,  # arcface: angular margin (0.5); cosface: additive margin (0.35)
        "m1": 1.0,  # combined margin only: s·(cos(m1·θ + m2) − m3)
        "m2": 0.5,
        "m3": 0.0,
        "easy_margin": False,
        "label_smoothing": 0.0,
        "focal_gamma": 0.0,  # > 0: focal loss on top of the classification loss
        "weight": 1.0,  # weight of the classification term
        "sharded": "auto",  # auto (classes split over ranks when there are several) | true | false
        "sample_rate": 1.0,  # sharded head: fraction of each shard's classes scored per step (Partial FC)
        "center": None,  # {weight: 0.01}
        "triplet": None,  # {weight: 1.0, margin: 0.3}; needs data.sampler=pk
        "distill": None,  # {weight: 1.0, mode: embedding | similarity}; needs data.teacher
    },
    "optim": {
        "name": "sgd",  # sgd | adamw
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "betas": [0.9, 0.999],
        "weight_decay": 5.0e-4,
        "head_lr_mult": 1.0,
        "head_weight_decay": None,  # null: same as weight_decay
        "grad_clip": 0.0,  # max grad norm; 0 = off
        "grad_clip_params": "all",  # all | backbone (arcface_torch clips the backbone only)
    },
    "schedule": {
        "steps": 1000,
        "epochs": 0.0,  # > 0: steps = epochs × batches per epoch
        "warmup_steps": 0,
        "warmup_epochs": 0.0,
        "min_lr_ratio": 0.0,
        "restarts": 0,  # cosine warm restarts: extra cycles after the first
        "restart_mult": 1.0,  # each cycle this much longer than the previous
        "freeze": [],  # [{modules: [name prefixes], until_step: N}]
    },
    "train": {
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "amp": "auto",  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
        "channels_last": False,
        "checkpoint_every": 500,
        "log_every": 10,  # also how often the host waits for the device (losses, non-finite checks, stop flags)
        "accumulate": 1,  # micro-batches per optimizer step
        "deterministic": False,
        "threads": 0,  # torch CPU threads; 0 = torch's default
        "progress": True,
        "tensorboard": True,
        "stop_after": 0,  # stop (with a checkpoint) after this many steps in this invocation
        "time_limit_min": 0.0,  # stop (with a checkpoint) after this many minutes in this invocation
    },
    "eval": {
        "format": "none",  # none | bin | lfw
        "path": None,  # .bin file or list of them (lfw, cfp_fp, agedb_30), or the root of an aligned LFW tree
        "pairs": None,  # pairs.txt for format lfw
        "max_pairs": 0,  # 0 = all
        "every": 0,  # steps; 0 = only at the end
        "batch_size": 64,
        "optional": False,  # true: a missing pair set skips evaluation with a warning instead of failing
    },
}

CHOICES = {
    "task": {"recognition"},
    "data.format": {"folder", "list", "rec", "synthetic"},
    "data.cache": {"auto", "decoded", "encoded", "none"},
    "data.transfer": {"uint8", "float32"},
    "optim.grad_clip_params": {"all", "backbone"},
    "data.sampler": {"shuffle", "pk"},
    "loss.head": {"arcface", "cosface", "combined", "softmax", "none"},
    "optim.name": {"sgd", "adamw"},
    "train.amp": {"auto", "off", "bf16", "fp16"},
    "eval.format": {"none", "bin", "lfw"},
}

#: Keys whose values are free-form (not checked against the defaults' types).
FREE_FORM = {"backbone_kwargs", "data.augment", "schedule.freeze", "data.pin_memory", "loss.center", "loss.triplet",
             "loss.distill", "loss.sharded", "eval.path"}

#: Every key of an aligner config (``task: landmarks``), with its default.
ALIGNER_DEFAULTS: dict[str, Any] = {
    "name": "aligner",
    "task": "landmarks",
    "arch": "hourglass",
    "seed": 0,
    "output": None,  # default runs/<name>
    "stacks": 2,  # hourglasses; every stack's heatmaps are supervised
    "channels": 64,
    "depth": 3,  # pooling levels per hourglass
    **AlignerGeometry().to_dict(),  # input_size, heatmap_size, sigma, crop_scale, center_shift, derotate, flip_test
    # when the runtime returns the detector's points instead (runtime.landmarks.FallbackRule):
    # {min_peak, max_disagreement}, or null: measured on the training faces at the end of training
    "fallback": None,
    "fallback_coverage": 0.99,  # the measured rule keeps the aligner on this fraction of training faces; 0: no rule
    "data": {
        "root": "$FACEKIT_DATA/landmarks_300w",
        "train": ["train", "afw"],  # folders under root with images + .pts5
        "test": "test",
    },
    "augment": {
        "rotation": 30.0,  # degrees, uniform in ±rotation ...
        "rotation_p": 0.6,  # ... for this fraction of samples
        "scale": [0.85, 1.15],
        "translate": 0.06,  # fraction of the crop side
        "flip": 0.5,  # horizontal flip with left/right landmarks swapped
        "brightness": 0.3,
        "contrast": 0.3,
        "saturation": 0.3,
        "grayscale": 0.2,
        "blur": 0.1,
    },
    "loss": {
        "foreground_weight": 0.0,  # MSE pixel weight 1 + this × target
        "coord_weight": 0.0,  # + this × L1 of the soft-argmax point
        "beta": 20.0,  # soft-argmax sharpness
    },
    "optim": {
        "batch_size": 16,
        "epochs": 40,
        "lr": 2.0e-3,
        "weight_decay": 1.0e-4,
        "warmup_steps": 100,
        "checkpoint_every": 50,
        "eval_every": 5,  # epochs between test evaluations (log.csv)
        "threads": 1,  # torch CPU threads
        "max_minutes": 0.0,  # > 0: the run ends at the epochs or this budget, whichever comes first
    },
}

ALIGNER_CHOICES = {"task": {"landmarks"}, "arch": {"hourglass"}}


class ConfigError(ValueError):
    """A config is invalid; the message names the key."""


def expand_path(p: str | None) -> Path | None:
    """``$FACEKIT_DATA`` / ``~`` / env vars expanded; relative paths stay relative to the working directory."""
    if p is None or p == "":
        return None
    root = str(data_root())
    s = str(p).replace("${FACEKIT_DATA}", root).replace("$FACEKIT_DATA", root)
    return Path(os.path.expanduser(os.path.expandvars(s)))


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``0.1`` → float, ``true`` → bool, ``[a, b]`` → list, else the string)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _merge(base: dict, update: dict, prefix: str = "", free_form: frozenset[str] = frozenset(FREE_FORM)) -> dict:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = [f"{prefix}{k}" for k in base]
            close = difflib.get_close_matches(dotted, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        if isinstance(base[key], dict) and dotted not in free_form:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping, got {value!r}")
            _merge(base[key], value, dotted + ".", free_form)
        else:
            base[key] = copy.deepcopy(value)
    return base


def set_dotted(cfg: dict, dotted: str, value: Any, free_form: frozenset[str] = frozenset(FREE_FORM)) -> None:
    """Set ``a.b.c`` in ``cfg`` (the key must exist in the defaults)."""
    parts = dotted.split(".")
    update: dict = {}
    node = update
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    _merge(cfg, update, free_form=free_form)


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def validate(cfg: dict, defaults: dict | None = None, prefix: str = "", schema: Schema | None = None) -> dict:
    """Check types and choices; convert ints given for float keys. Returns ``cfg``.

    ``schema`` None: the schema of ``cfg["task"]`` (recognition when absent); ``defaults`` and ``prefix``
    select a section while recursing."""
    if schema is None:
        schema = schema_for(cfg.get("task", "recognition"))
    for key, default in (schema.defaults if defaults is None else defaults).items():
        dotted = f"{prefix}{key}"
        value = cfg.get(key)
        if isinstance(default, dict) and dotted not in schema.free_form:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping, got {value!r}")
            validate(value, default, dotted + ".", schema)
            continue
        if dotted in schema.free_form:
            continue
        if not _type_ok(default, value):
            raise ConfigError(f"{dotted} must be {type(default).__name__}, got {value!r}")
        if isinstance(default, float) and value is not None:
            cfg[key] = float(value)
        if dotted in schema.choices and value not in schema.choices[dotted]:
            raise ConfigError(f"{dotted} must be one of {sorted(schema.choices[dotted])}, got {value!r}")
    if prefix == "":
        schema.check(cfg)
    return cfg


def _validate_semantics(cfg: dict) -> None:
    d, s, o = cfg["data"], cfg["schedule"], cfg["optim"]
    if cfg["embedding_size"] < 1:
        raise ConfigError("embedding_size must be ≥ 1")
    if d["batch_size"] < 2:
        raise ConfigError("data.batch_size must be ≥ 2")
    if d["sampler"] == "pk" and d["pk_p"] * d["pk_k"] != d["batch_size"]:
        raise ConfigError(f"data.sampler=pk needs data.batch_size = pk_p × pk_k = {d['pk_p'] * d['pk_k']}, "
                          f"got {d['batch_size']}")
    if d["pin_memory"] not in ("auto", True, False):
        raise ConfigError(f"data.pin_memory must be auto, true or false, got {d['pin_memory']!r}")
    needs = {"folder": "root", "list": "list", "rec": "rec"}.get(d["format"])
    if needs and not d[needs]:
        raise ConfigError(f"data.format={d['format']} needs data.{needs}")
    if s["steps"] < 1 and s["epochs"] <= 0:
        raise ConfigError("schedule.steps must be ≥ 1 (or schedule.epochs > 0)")
    if o["lr"] <= 0:
        raise ConfigError("optim.lr must be > 0")
    loss = cfg["loss"]
    for part in ("center", "triplet", "distill"):
        if loss[part] not in (None, False, True) and not isinstance(loss[part], dict):
            raise ConfigError(f"loss.{part} must be a mapping like {{weight: 1.0}} or null, got {loss[part]!r}")
    if loss["m"] is not None and not isinstance(loss["m"], (int, float)):
        raise ConfigError(f"loss.m must be a number or null, got {loss['m']!r}")
    if loss["head"] == "none" and not (loss["triplet"] or loss["distill"]):
        raise ConfigError("loss.head=none needs loss.triplet or loss.distill")
    if loss["distill"] and not d["teacher"]:
        raise ConfigError("loss.distill needs data.teacher (an npz of teacher embeddings)")
    if loss["triplet"] and d["sampler"] != "pk":
        raise ConfigError("loss.triplet needs data.sampler=pk (positives in every batch)")
    _validate_scale(cfg)
    e = cfg["eval"]
    if e["format"] != "none" and not e["path"]:
        raise ConfigError(f"eval.format={e['format']} needs eval.path")
    if isinstance(e["path"], list) and (e["format"] != "bin" or not all(isinstance(p, str) for p in e["path"])):
        raise ConfigError("eval.path may be a list of .bin files only with eval.format=bin")
    if e["path"] is not None and not isinstance(e["path"], (str, list)):
        raise ConfigError(f"eval.path must be a path or a list of .bin paths, got {e['path']!r}")
    if cfg["eval"]["format"] == "lfw" and not cfg["eval"]["pairs"]:
        raise ConfigError("eval.format=lfw needs eval.pairs (pairs.txt)")
    for i, f in enumerate(s["freeze"] or []):
        if not isinstance(f, dict) or set(f) != {"modules", "until_step"}:
            raise ConfigError(f"schedule.freeze[{i}] must be {{modules: [prefix, ...], until_step: N}}, got {f!r}")


def _validate_scale(cfg: dict) -> None:
    """Multi-process keys: the sharded head, class sampling, accumulation."""
    loss = cfg["loss"]
    if loss["sharded"] not in ("auto", True, False):
        raise ConfigError(f"loss.sharded must be auto, true or false, got {loss['sharded']!r}")
    if not 0.0 < loss["sample_rate"] <= 1.0:
        raise ConfigError(f"loss.sample_rate must be in (0, 1], got {loss['sample_rate']}")
    if loss["sample_rate"] < 1.0 and loss["sharded"] is False:
        raise ConfigError("loss.sample_rate < 1 needs the sharded head (loss.sharded: auto or true)")
    if loss["sharded"] is True and str(loss["head"]) not in ("arcface", "cosface", "combined"):
        raise ConfigError(f"loss.sharded=true needs a margin head (arcface, cosface, combined), got {loss['head']}")
    if cfg["train"]["accumulate"] < 1:
        raise ConfigError("train.accumulate must be ≥ 1")
    if cfg["train"]["log_every"] < 1:
        raise ConfigError("train.log_every must be ≥ 1")


def _validate_aligner(cfg: dict) -> None:
    try:
        geometry = AlignerGeometry.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"aligner geometry (input_size, heatmap_size, sigma, crop_scale): {e}") from None
    for key in ("input_size", "heatmap_size"):
        if len(cfg[key]) != 2 or not all(isinstance(v, int) and v > 0 for v in cfg[key]):
            raise ConfigError(f"{key} must be [height, width] positive integers, got {cfg[key]!r}")
    for key in ("stacks", "channels", "depth"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be ≥ 1, got {cfg[key]}")
    cell = 2 ** cfg["depth"]
    if geometry.heatmap_size[0] % cell or geometry.heatmap_size[1] % cell:
        raise ConfigError(f"heatmap_size {list(geometry.heatmap_size)} must be divisible by 2**depth = {cell}")
    if geometry.stride not in (1, 2, 4):
        raise ConfigError(f"the stride input_size / heatmap_size must be 1, 2 or 4, got {geometry.stride}")
    d, a, o = cfg["data"], cfg["augment"], cfg["optim"]
    if not d["train"] or not all(isinstance(v, str) for v in d["train"]):
        raise ConfigError(f"data.train must be a list of folder names, got {d['train']!r}")
    if len(a["scale"]) != 2 or not 0 < a["scale"][0] <= a["scale"][1]:
        raise ConfigError(f"augment.scale must be [low, high] with 0 < low <= high, got {a['scale']!r}")
    for key in ("rotation_p", "flip", "grayscale", "blur"):
        if not 0 <= a[key] <= 1:
            raise ConfigError(f"augment.{key} is a probability in [0, 1], got {a[key]}")
    if o["batch_size"] < 1 or o["epochs"] < 1:
        raise ConfigError("optim.batch_size and optim.epochs must be ≥ 1")
    if o["lr"] <= 0:
        raise ConfigError("optim.lr must be > 0")
    if o["checkpoint_every"] < 1 or o["eval_every"] < 1:
        raise ConfigError("optim.checkpoint_every and optim.eval_every must be ≥ 1")
    if not 0 <= cfg["fallback_coverage"] < 1:
        raise ConfigError(f"fallback_coverage must be in [0, 1), got {cfg['fallback_coverage']}")
    rule = cfg["fallback"]
    if rule is not None and (not isinstance(rule, dict) or set(rule) != {"min_peak", "max_disagreement"}
                             or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rule.values())):
        raise ConfigError(f"fallback must be null or {{min_peak: number, max_disagreement: number}}, got {rule!r}")


@dataclass(frozen=True)
class Schema:
    """The keys a task's config may have (with defaults and types), allowed values, free-form keys and the
    checks across keys."""

    defaults: dict[str, Any]
    choices: dict[str, set]
    free_form: frozenset[str]
    check: Callable[[dict], None]


SCHEMAS = {
    "recognition": Schema(DEFAULTS, CHOICES, frozenset(FREE_FORM), _validate_semantics),
    "landmarks": Schema(ALIGNER_DEFAULTS, ALIGNER_CHOICES, frozenset({"fallback"}), _validate_aligner),
}


def schema_for(task: Any) -> Schema:
    """The schema of ``task`` (``recognition`` or ``landmarks``)."""
    if task not in SCHEMAS:
        raise ConfigError(f"task must be one of {sorted(SCHEMAS)}, got {task!r}")
    return SCHEMAS[task]


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.1", ...]`` → ``[("optim.lr", 0.1), ...]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        out.append((key.strip(), parse_value(value)))
    return out


def add_override_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable; collected in ``args.sets``): overrides for :func:`load_config`."""
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted), repeatable")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults ← YAML file ← ``key=value`` overrides, validated. The name defaults to the file's stem.

    The ``task`` (of the overrides, else of the file, else ``recognition``) picks the schema."""
    loaded: dict = {}
    if path is not None:
        path = existing_file(path, ConfigError, "config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        loaded.setdefault("name", path.stem)
    pairs = parse_overrides(overrides)
    task = dict(pairs).get("task", loaded.get("task", "recognition"))
    schema = schema_for(task)
    cfg = copy.deepcopy(schema.defaults)
    _merge(cfg, loaded, free_form=schema.free_form)
    for key, value in pairs:
        set_dotted(cfg, key, value, schema.free_form)
    return validate(cfg, schema=schema)


def output_dir(cfg: dict) -> Path:
    """The run's output folder: ``cfg['output']`` or ``runs/<name>``."""
    return expand_path(cfg["output"]) if cfg["output"] else Path("runs") / cfg["name"]


def save_config(cfg: dict, path: str | Path) -> Path:
    """Write ``cfg`` as YAML atomically."""
    return atomic_write_bytes(path, yaml.safe_dump(cfg, sort_keys=False).encode())


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and f"{prefix}{key}" not in FREE_FORM:
            out += diff_configs(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out

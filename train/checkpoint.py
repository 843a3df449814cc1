"""Atomic checkpoints and rebuilding models from them.

A checkpoint is a dict with at least ``"model"`` (a state_dict) and ``"config"`` (the experiment config;
``config["task"]`` is ``"recognition"`` (``arch``, ``embedding_size``) or ``"landmarks"``), plus whatever the
trainer keeps (step, optimizer, scheduler, scaler, rng, sampler, head, best_metric). Which files to keep
(``last.pt``, ``best.pt``, ``step_*.pt``) is the trainer's business; every write here is atomic.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.files import atomic_write, existing_file, pid_temp_prefix, remove_stale_temporaries, sha256_file

from .hourglass import build_aligner

#: Stored in every checkpoint written by :func:`save_checkpoint`.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable (truncated, corrupt) or not a facekit checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, flush, fsync, ``os.replace``.

    A reader sees either the previous complete file or the new complete file, never a partial one,
    even when the writer is killed. Returns the path.
    """
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**state, "facekit_checkpoint": FORMAT_VERSION}
    atomic_write(path, lambda f: torch.save(payload, f), tmp_prefix=pid_temp_prefix(path))
    remove_stale_temporaries(path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    weights_only: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict; raise :class:`CheckpointError` naming the file when it is truncated or foreign.

    ``weights_only=False`` (default) allows the numpy/python RNG states trainers store: load only
    checkpoints you trust. ``mmap=True`` maps the tensors from the file instead of reading them (a rank of a
    sharded run then reads only its rows of the head). Missing files raise ``FileNotFoundError``.
    """
    path = existing_file(path, FileNotFoundError, "checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(map(str, state))[:8]}"
        raise CheckpointError(f"{path} is not a facekit checkpoint (expected a dict with 'model'; got {kind})")
    return state


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the checkpoint file (recorded in exported models' metadata)."""
    return sha256_file(path)


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build the (untrained) model a config describes: a recognizer backbone or, for task "landmarks", the aligner."""
    task = config.get("task", "recognition")
    if task == "landmarks":
        return build_aligner(config)
    if task != "recognition":
        raise ValueError(f"unknown task {task!r} in config (expected 'recognition' or 'landmarks')")
    if "arch" not in config:
        raise ValueError("recognition config lacks 'arch'")
    from train.backbones import build_backbone

    return build_backbone(config["arch"], int(config.get("embedding_size", 512)), **config.get("backbone_kwargs", {}))


def build_model_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in checkpoint ``path``; returns ``(model.eval(), config)``."""
    state = load_checkpoint(path)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no 'config' dict; cannot tell which model it holds")
    model = build_model(config)
    try:
        model.load_state_dict(_strip_prefixes(state["model"]), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: {e}") from e
    return model.eval(), config


def strip_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write only what inference needs (``model``, ``config``, ``step``, ``best_metric``) from ``src`` to ``dst``.

    The result is the small file that ships beside an exported model; ``build_model_from_checkpoint`` loads it.
    """
    state = load_checkpoint(src)
    keep = {k: state[k] for k in ("model", "config", "step", "best_metric") if k in state}
    return save_checkpoint(dst, keep)


if __name__ == "__main__":  # python -m train.checkpoint strip SRC DST
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "strip":
        sys.exit("usage: python -m train.checkpoint strip SRC.pt DST.pt")
    print(strip_checkpoint(sys.argv[2], sys.argv[3]))

"""Train a face recognizer (ArcFace and friends) from a YAML experiment config.

    python train/arcface.py --config train/configs/smoke.yaml [--resume [CKPT|DIR]] [key=value ...]
    python train/arcface.py --config X.yaml --set optim.lr=0.05 --set data.batch_size=256
    torchrun --nproc_per_node 8 train/arcface.py --config train/configs/r50_arcface_ms1m.yaml
    python train/arcface.py --describe mobilefacenet      # prints params=<int> macs=<int>

The last line printed by a run is ``output: <dir>`` (the folder with last.pt, best.pt, log.csv, config.yaml).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def describe(arch: str, embedding_size: int = 512) -> str:
    """``params=<int> macs=<int>`` of backbone ``arch`` at 112×112 (conv + linear MACs)."""
    from train.backbones import build_backbone
    from train.complexity import count_params_macs

    params, macs = count_params_macs(build_backbone(arch, embedding_size))
    return f"params={params} macs={macs}"


def parse_args(argv=None) -> argparse.Namespace:
    from train.config import add_override_option

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="experiment YAML (train/configs/*.yaml)")
    ap.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                    help="continue the run in the config's output folder (or from CKPT / a run folder)")
    ap.add_argument("--overwrite", action="store_true", help="start again even if the output folder holds a run")
    add_override_option(ap)
    ap.add_argument("--describe", metavar="ARCH", help="print params=<int> macs=<int> of a backbone and exit")
    ap.add_argument("--embedding-size", type=int, default=512, help="with --describe")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. optim.lr=0.1")
    args = ap.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse took the override as --resume's optional CKPT; give it back
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.describe:
        print(describe(args.describe, args.embedding_size))
        return 0
    if args.config is None and not args.resume:
        print("error: --config is required (or --describe ARCH)", file=sys.stderr)
        return 2
    from train.config import ConfigError, load_config
    from train.datasets import DataError

    try:
        config_path = args.config
        if config_path is None:  # --resume DIR alone: that run's saved config
            run = Path(args.resume) if args.resume is not True else None
            if run is None:
                raise ConfigError("--resume without --config needs a run folder: --resume runs/NAME")
            config_path = (run if run.is_dir() else run.parent) / "config.yaml"
        cfg = load_config(config_path, [*args.sets, *args.overrides])
        from train.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    finally:
        if trainer.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not trainer.is_main:
        return 0
    last = summary["last"]
    msg = f"step {summary['step']}/{summary['total_steps']}"
    if last.get("loss") is not None:
        msg += f" loss {last['loss']:.4f}"
    if summary["best_metric"] is not None:
        msg += f" best eval accuracy {summary['best_metric']:.4f}"
    if summary["stopped"]:
        msg += f" (stopped: {summary['stopped']}; continue with --resume)"
    print(msg)
    print(f"output: {summary['output']}")
    stopped = summary["stopped"]
    return 128 + signal.Signals[stopped].value if stopped in ("SIGINT", "SIGTERM") else 0


if __name__ == "__main__":
    sys.exit(main())

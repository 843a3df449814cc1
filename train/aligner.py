"""Train or evaluate the stacked-hourglass 5-point aligner.

    python train/aligner.py --config train/configs/aligner_300w.yaml --out runs/aligner_default
    python train/aligner.py --config train/configs/aligner_300w.yaml --out runs/aligner_default --resume
    python train/aligner.py --config train/configs/aligner_300w.yaml --set optim.max_minutes=5
    python train/aligner.py --eval runs/aligner_default/last.pt --data $FACEKIT_DATA/landmarks_300w/test
    python train/aligner.py --eval runtime/models/aligner.onnx --data $FACEKIT_DATA/landmarks_300w/test
    python export/to_onnx.py --checkpoint runs/aligner_default/last.pt --out aligner.onnx   # export

``--eval`` prints NME and failure rate of the aligner and of the detector's own 5 points, side by side,
on the same images and from the same detector boxes. The network is :mod:`train.hourglass`, the data and
augmentation :mod:`train.landmark_data`, the loop :mod:`train.aligner_loop`, the config schema
:data:`train.config.ALIGNER_DEFAULTS`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from train.model_files import is_checkpoint

EXPORT_HINT = "export an aligner checkpoint with: python export/to_onnx.py --checkpoint CKPT --out aligner.onnx"


def build_parser() -> argparse.ArgumentParser:
    from train.config import add_override_option

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="aligner YAML (train/configs/aligner_300w.yaml)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the config's output, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_override_option(p)
    p.add_argument("--eval", metavar="MODEL", help="evaluate an aligner checkpoint (.pt) or ONNX file")
    p.add_argument("--data", type=Path, help="landmark folder for --eval (images + .pts5)")
    p.add_argument("--json", action="store_true", help="--eval: print one JSON line")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", help=argparse.SUPPRESS)
    return p


def load_refiner(path: str | os.PathLike, fallback: bool | None = None):
    """The refiner of an aligner file: a checkpoint runs in PyTorch (:class:`train.aligner_refiner.TorchRefiner`),
    an export (ONNX, engine) in the runtime (:class:`runtime.landmarks.LandmarkRefiner`); torch is imported
    only for a checkpoint. ``fallback=False`` turns the model's fallback rule off (the aligner's own points)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aligner model {path} not found")
    if is_checkpoint(path):
        from train.aligner_refiner import TorchRefiner

        return TorchRefiner(path, fallback=fallback)
    from runtime.landmarks import LandmarkRefiner

    return LandmarkRefiner(str(path), fallback=fallback)


def evaluate(model: str, data: Path, as_json: bool, progress: bool) -> None:
    from evaluation.landmarks import evaluate_landmarks, format_table

    result = evaluate_landmarks(data, load_refiner(model), progress=progress)
    print(json.dumps(result) if as_json else format_table(result))


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.export:
        p.error(EXPORT_HINT)
    from train.config import ConfigError, load_config, output_dir

    if a.eval:
        if a.data is None:
            p.error("--eval needs --data DIR")
        try:
            evaluate(a.eval, a.data, a.json, not a.no_progress)
        except (FileNotFoundError, ValueError) as e:  # missing / foreign model or data: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not a.config:
        p.error("give --config to train or --eval MODEL --data DIR to evaluate")
    try:
        cfg = load_config(a.config, a.sets)
        if cfg["task"] != "landmarks":
            raise ConfigError(f"{a.config}: task is {cfg['task']!r}; the aligner trains task 'landmarks'")
        from train.aligner_loop import train

        metrics = train(cfg, a.out or output_dir(cfg), resume=a.resume, progress=not a.no_progress)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``facekit`` command: every facekit tool behind one front door.

    facekit detect|compare|matrix|enroll|identify|…  PHOTO …   # the runtime's commands (python -m runtime)
    facekit benchmark [ARGS]                                    # python benchmarks/run.py
    facekit export onnx|trt|… [ARGS]                           # python export/to_onnx.py, export/to_trt.py, …
    facekit train [ARGS]                                        # python train/arcface.py
    facekit align-dataset [ARGS]                                # python train/make_aligned.py
    facekit train-aligner [ARGS]                                # python train/aligner.py
    facekit import-dlib [ARGS]                                  # python -m train.dlib_import
    facekit version

Each tool is imported only when its command runs: the runtime's commands never import torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Sequence

#: command → (module whose ``main(argv)`` runs it, one-line help); the runtime's own commands are separate.
TOOLS: dict[str, tuple[str, str]] = {
    "benchmark": ("benchmarks.run", "accuracy, parity, latency and throughput reports (benchmarks/run.py)"),
    "train": ("train.arcface", "train a recognizer from a YAML config (train/arcface.py)"),
    "align-dataset": ("train.make_aligned", "photos → aligned, labelled training crops (train/make_aligned.py)"),
    "train-aligner": ("train.aligner", "train or evaluate the 5-point landmark aligner (train/aligner.py)"),
    "import-dlib": ("train.dlib_import", "dlib's face ResNet weights → a PyTorch checkpoint (train/dlib_import.py)"),
}
#: ``facekit export KIND`` → one-line help; KIND runs the module ``export.to_<KIND>`` (:func:`_exporter_module`).
EXPORTERS: dict[str, str] = {
    "onnx": "checkpoint → ONNX (fp32 / fp16 / INT8), checked against PyTorch",
    "trt": "ONNX → TensorRT engine, cached and checked (needs tensorrt)",
    "triton": "models → a Triton Inference Server model repository",
}


def _exporter_module(kind: str) -> str:
    return f"export.to_{kind}"


def _installed_exporters() -> list[str]:
    """The export kinds whose module is importable here."""
    return [k for k in EXPORTERS if importlib.util.find_spec(_exporter_module(k)) is not None]


def _usage() -> str:
    from runtime.cli import build_parser

    runtime_cmds = build_parser("facekit").commands
    width = max(map(len, [*TOOLS, *(f"export {k}" for k in EXPORTERS), "version"])) + 2
    lines = ["usage: facekit COMMAND [ARGS]", "", "runtime (torch-free): " + ", ".join(runtime_cmds), ""]
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in TOOLS.items()]
    lines += [f"  {'export ' + kind:<{width}}{EXPORTERS[kind]}" for kind in _installed_exporters()]
    lines += [f"  {'version':<{width}}print facekit's version", "", "facekit COMMAND --help for a command's options."]
    return "\n".join(lines)


def _run(module: str, argv: list[str], prog: str) -> int:
    sys.argv[0] = prog
    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("version", "--version"):
        from runtime import __version__

        print(f"facekit {__version__}")
        return 0
    if command in TOOLS:
        return _run(TOOLS[command][0], rest, f"facekit {command}")
    if command == "export":
        kinds = _installed_exporters()
        if not rest or rest[0] not in kinds:
            print(f"usage: facekit export {{{','.join(kinds)}}} [ARGS]", file=sys.stderr)
            return 2
        return _run(_exporter_module(rest[0]), rest[1:], f"facekit export {rest[0]}")
    from runtime.cli import main as runtime_main

    return runtime_main(args, prog="facekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

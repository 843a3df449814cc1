"""Command-line options built from dataclass fields: the defaults are the dataclass's, switches invert bools."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runtime.field_options import FieldOptions


@dataclass(frozen=True)
class Settings:
    size: int = 112
    ratio: float = 0.5
    name: str = "tree"
    model: Path = Path("models/a.onnx")
    workers: int = field(default_factory=lambda: 3)
    flip: bool = True
    debug: bool = False
    template: tuple | None = None


def _parser() -> tuple[argparse.ArgumentParser, FieldOptions]:
    options = FieldOptions(Settings)
    p = argparse.ArgumentParser()
    options.add(p, "size", "crop side")
    options.add(p, "ratio", "a ratio", flag="--share")
    options.add(p, "name", "layout", choices=("tree", "flat"))
    options.add(p, "model", "model file")
    options.add(p, "workers", "threads", shown="the usable cores")
    options.add(p, "flip", "embed each face once")
    options.add(p, "debug", "write overlays")
    return p, options


def test_no_options_give_the_dataclass_defaults():
    p, options = _parser()
    assert options.build(p.parse_args([])) == Settings()


def test_options_are_typed_like_their_defaults_and_switches_invert_bools():
    p, options = _parser()
    got = options.build(p.parse_args(["--size", "96", "--share", "0.25", "--name", "flat", "--model", "b.onnx",
                                      "--workers", "5", "--no-flip", "--debug"]), template=((1, 2),))
    assert got == Settings(96, 0.25, "flat", Path("b.onnx"), 5, False, True, ((1, 2),))
    with pytest.raises(SystemExit):
        p.parse_args(["--size", "big"])
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "round"])


def test_help_shows_each_default():
    p, _ = _parser()
    text = " ".join(p.format_help().split())
    for shown in ("crop side (default 112)", "a ratio (default 0.5)", "model file (default models/a.onnx)",
                  "threads (default the usable cores)", "--no-flip", "--debug"):
        assert shown in text


def test_commands_without_options_build_the_library_defaults():
    from benchmarks import cpu_backends
    from benchmarks.run import build_parser as benchmarks_parser
    from export import to_triton, to_trt
    from export.triton_repository import ServingOptions
    from export.trt_build import BuildOptions
    from runtime.serve import config as serve

    assert to_triton.SERVING.build(to_triton.build_parser().parse_args(["--out", "x"])) == ServingOptions()
    assert to_trt.BUILD.build(to_trt.build_parser().parse_args(["m.onnx"])) == BuildOptions()
    args = benchmarks_parser().parse_args(["cpu"])
    assert cpu_backends.OPTIONS.build(args, model=cpu_backends.Options().model, seconds=1.0,
                                      quiet=False) == cpu_backends.Options()
    p = argparse.ArgumentParser()
    serve.add_serve_arguments(p)
    assert serve.config_from_args(p.parse_args(["--galleries", "g"])) == serve.ServeConfig(galleries=Path("g"))

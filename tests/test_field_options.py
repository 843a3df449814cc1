"""Command-line options built from dataclass fields: the defaults are the dataclass's, switches invert bools."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from runtime.field_options import FieldOptions, add_list_option, comma_list, option


@dataclass(frozen=True)
class Settings:
    size: int = option(112, "crop side")
    ratio: float = option(0.5, "a ratio", flag="--share")
    name: str = option("tree", "layout", choices=("tree", "flat"))
    model: Path = option(Path("models/a.onnx"), "model file")
    workers: int = option(default_factory=lambda: 3, help="threads", shown="the usable cores")
    flip: bool = option(True, "embed each face once")
    debug: bool = option(False, "write overlays")
    template: tuple | None = None


def _parser() -> tuple[argparse.ArgumentParser, FieldOptions]:
    options = FieldOptions(Settings)
    p = argparse.ArgumentParser()
    options.add(p, "size")
    p.add_argument("--size-note", help="an option of the parser's own between the fields' options")
    options.add(p)
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


def test_each_option_is_added_once_in_field_order_and_plain_fields_have_none():
    p, options = _parser()
    flags = [a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help"]
    assert flags == ["--size", "--size-note", "--share", "--name", "--model", "--workers", "--no-flip", "--debug"]
    with pytest.raises(TypeError, match="Settings.template is not declared with option"):
        options.add(argparse.ArgumentParser(), "template")


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


def test_the_index_command_builds_the_library_job():
    from runtime.cli import build_parser as runtime_parser
    from runtime.index_cli import job_from_args
    from runtime.indexer import IndexJob

    def job(*options: str) -> IndexJob:  # the pipeline's keyword arguments aside
        args = runtime_parser().parse_args(["index", "photos", "--out", "g.npz", *options])
        return replace(job_from_args(args), pipeline={})

    root = str(Path("photos").resolve())
    assert job() == IndexJob(root)
    assert job("--min-face", "40", "--threads", "2", "--retry-threshold", "0.3") == IndexJob(
        root, min_face=40.0, threads=2, retry_threshold=0.3)


@dataclass(frozen=True)
class Sweep:
    batches: tuple = option((1, 8, 64), "batch sizes", type=comma_list(int, minimum=1))
    scales: tuple = option((0.5, 2.0), "scales")


def test_comma_separated_lists_read_into_tuples_and_show_their_defaults():
    options = FieldOptions(Sweep)
    p = argparse.ArgumentParser()
    options.add(p)
    add_list_option(p, "--parts", ("loader", "ranks"), "what to measure", choices=("loader", "ranks", "rec-open"))
    args = p.parse_args([])
    assert options.build(args) == Sweep() and args.parts == ("loader", "ranks")
    args = p.parse_args(["--batches", "4, 16,", "--scales", "3", "--parts", "rec-open"])
    assert options.build(args) == Sweep((4, 16), (3.0,)) and args.parts == ("rec-open",)
    text = " ".join(p.format_help().split())
    for shown in ("batch sizes (default 1,8,64)", "scales (default 0.5,2)", "what to measure (default loader,ranks)"):
        assert shown in text


def test_a_list_option_needs_an_item_type():
    with pytest.raises(TypeError, match="non-empty default"):
        add_list_option(argparse.ArgumentParser(), "--sizes", (), "sizes")


@pytest.mark.parametrize("argv, message", [
    (["--batches", "4,x"], "expected comma-separated int values, got '4,x'"),
    (["--batches", "8,0"], "0 in '8,0': each value must be at least 1"),
    (["--batches", ","], "expected at least one value, got ','"),
    (["--parts", "loader,gpu"], "'gpu' in 'loader,gpu': each value must be one of loader, ranks"),
])
def test_bad_list_values_are_usage_errors_that_name_them(argv, message, capsys):
    p = argparse.ArgumentParser()
    add_list_option(p, "--batches", (1,), "batch sizes", minimum=1)
    add_list_option(p, "--parts", ("loader",), "parts", choices=("loader", "ranks"))
    with pytest.raises(SystemExit) as exit:
        p.parse_args(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err

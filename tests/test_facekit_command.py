"""The ``facekit`` front door: its usage, the export kinds it dispatches to, and the installed console script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need
from facekit.cli import EXPORTERS, main
from runtime import __version__


def test_usage_lists_every_tool_and_exporter(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("benchmark", "train-aligner", "export onnx", "export triton", "version"):
        assert f"  {line} " in out, out
    assert main([]) == 2  # no command: the same usage, as an error


def test_export_without_a_known_kind_is_refused_with_the_kinds(capsys):
    for argv in (["export"], ["export", "tflite"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: facekit export {") and all(k in err for k in ("onnx", "triton")), err


def test_export_kind_runs_its_exporter_under_the_facekit_name(capsys):
    for kind in EXPORTERS:  # export trt --help works without tensorrt
        with pytest.raises(SystemExit) as done:
            main(["export", kind, "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: facekit export {kind} ")


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"facekit {__version__}"


def test_installed_script_runs_the_runtime_commands_outside_the_checkout(facekit_data, tmp_path):
    script = Path(sys.executable).with_name("facekit")
    if not script.exists():
        pytest.skip(f"{script} is absent: the project is not installed in this interpreter's environment")
    photo = need(facekit_data / "photos" / "obama.jpg")
    r = subprocess.run([str(script), "detect", str(photo), "--json"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    faces = json.loads(r.stdout)
    assert len(faces) >= 1 and len(faces[0]["landmarks"]) == 5

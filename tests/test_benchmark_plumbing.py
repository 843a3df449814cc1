"""What every benchmark shares: its report writer, file names and folder, child processes' environment, CPU line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.child_process import child_env
from benchmarks.cpu_plans import isa_summary, widest_isa
from benchmarks.report import RESULTS_DIR, machine_slug, results_dir, shown_path, write_md_and_json
from benchmarks.run import build_parser
from evaluation.data import PROJECT_ROOT
from runtime.cpu import first_isa, has_isa


def test_numpy_values_and_paths_are_written_and_a_bad_value_leaves_no_file(tmp_path):
    md, js = write_md_and_json(tmp_path / "2026-12-02-cpu-2c-x", "# report\n",
                               {"n": np.int64(3), "ms": np.float32(1.5), "rows": np.arange(2), "at": Path("/a")})
    assert (md.name, js.name) == ("2026-12-02-cpu-2c-x.md", "2026-12-02-cpu-2c-x.json")
    assert md.read_text() == "# report\n"
    assert json.loads(js.read_text()) == {"n": 3, "ms": 1.5, "rows": [0, 1], "at": "/a"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_md_and_json(tmp_path / "broken", "# report\n", {"x": object()})
    assert not list(tmp_path.glob("broken*"))


def test_a_child_finds_this_checkout_first_and_keeps_the_callers_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mine"), ""]))
    env = child_env(tmp_path / "extra", OMP_NUM_THREADS="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT), str(tmp_path / "extra"), str(tmp_path / "mine")]
    assert env["OMP_NUM_THREADS"] == "1"
    (tmp_path / "extra").mkdir()
    (tmp_path / "mine").mkdir()
    out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)[1:4] == [str(PROJECT_ROOT), str(tmp_path / "extra"), str(tmp_path / "mine")]


def test_reports_show_project_paths_relative_and_others_as_given(tmp_path):
    assert shown_path(PROJECT_ROOT / "runtime" / "models" / "recognizer.onnx") == "runtime/models/recognizer.onnx"
    assert shown_path(tmp_path / "elsewhere.onnx") == str(tmp_path / "elsewhere.onnx")


def test_reports_and_the_runtime_read_instruction_sets_from_the_same_flags():
    sapphire_rapids = frozenset("avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8".split())
    zen3 = frozenset("avx2 fma sse4_2".split())
    assert isa_summary(sapphire_rapids) == "AVX2, AVX-512, VNNI, AMX, AVX512-BF16"
    assert isa_summary(zen3) == "AVX2; no AVX-512, no VNNI, no AMX, no AVX512-BF16"
    assert isa_summary(frozenset()) == "CPU flags unknown"
    assert has_isa("VNNI", frozenset({"avx_vnni"})) and has_isa("AMX-BF16", sapphire_rapids)
    assert not any(has_isa(name, zen3) for name in ("VNNI", "AMX", "AMX-BF16", "AMX-INT8", "AVX512-BF16"))
    assert first_isa(("AMX-INT8", "VNNI"), sapphire_rapids) == "AMX-INT8" and first_isa(("VNNI",), zen3) is None


def test_no_write_and_results_reach_every_command_that_writes_a_report():
    """Given before the sub-command or after it, ``--no-write`` and ``--results`` decide where the report goes (a
    sub-command's own default must not overwrite them: ``run.py --no-write cpu`` wrote its report before)."""
    parser = build_parser()
    for command in ("cpu", "gallery", "training", "large-photos", "throughput", "triton", "serve"):
        assert results_dir(parser.parse_args([command])) == RESULTS_DIR, command
        assert results_dir(parser.parse_args(["--no-write", command])) is None, command
        assert results_dir(parser.parse_args(["--results", "elsewhere", command])) == Path("elsewhere"), command
    for command in ("cpu", "gallery", "training", "large-photos"):
        assert results_dir(parser.parse_args([command, "--no-write"])) is None, command


def test_report_names_tell_apart_cpus_sold_under_one_name():
    """Two 2-core "AMD EPYC" machines (Zen 3 with AVX2, Zen 4 with AVX-512) wrote one file name, so one's
    report of the day replaced the other's; the widest vector instruction set now tells them apart."""
    zen3, zen4 = frozenset({"avx2"}), frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert (widest_isa(zen3), widest_isa(zen4), widest_isa(frozenset({"sse2"}))) == ("AVX2", "AVX-512", None)
    slugs = {machine_slug({"cpu": "AMD EPYC", "widest_isa": widest_isa(f), "cores": 2, "gpus": []}) for f in (zen3, zen4)}
    assert slugs == {"amd-epyc-avx2-2c", "amd-epyc-avx512-2c"}
    assert machine_slug({"cpu": "Intel(R) Xeon(R) CPU @ 2.10GHz", "widest_isa": "AMX", "cores": 2}) == "intel-xeon-amx-2c"
    assert machine_slug({"cpu": "AMD EPYC", "widest_isa": "AVX2", "cores": 16, "gpus": ["NVIDIA H200"]}) == "nvidia-h200-16c"
    assert machine_slug({"cpu": "AMD EPYC", "cores": 2}) == "amd-epyc-2c"  # a report written before the field

"""`python benchmarks/run.py cpu`: recognizer rows and targets without data, the pipeline worker on real
LFW images, and how targets are decided."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, need

pytest.importorskip("openvino", reason="the CPU-backend benchmark compares OpenVINO with ONNX Runtime")
pytest.importorskip("onnxruntime", reason="the CPU-backend benchmark compares OpenVINO with ONNX Runtime")

from benchmarks import cpu_backends  # noqa: E402
from evaluation import pairs as ep  # noqa: E402
from runtime.backends.openvino import native_bf16  # noqa: E402

MODEL = ROOT / "runtime" / "models" / "mobilefacenet.onnx"


@pytest.mark.slow
def test_cpu_subcommand_without_data(tmp_path):
    env = dict(os.environ, FACEKIT_DATA=str(tmp_path / "no-data"), FACEKIT_CACHE=str(tmp_path / "cache"),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "cpu", "--model", str(need(MODEL)),
                           "--rounds", "1", "--seconds", "0.05", "--no-write", "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {(r["backend"], r["batch"]): r for r in report["throughput"]}
    expected = {"onnxruntime-cpu fp32", "openvino-cpu f32", "openvino-cpu f32, threads pinned", "openvino-cpu int8"} | (
        {"openvino-cpu bf16"} if native_bf16() else set())
    assert {b for b, _ in rows} == expected and {n for _, n in rows} == {1, 32}
    assert rows[("onnxruntime-cpu fp32", 32)]["speedup_vs_ort_fp32"] == 1.0
    assert rows[("openvino-cpu int8", 1)]["device"].startswith("OpenVINO CPU int8")
    assert "AMX" in report["machine"]["isa"] and report["machine"]["cpu"]
    assert report["pipeline"]["skip_reason"] and report["accuracy_parity"] == []
    assert all(t["holds"] is None and t["not_measured"] for t in report["targets"] if "bf16" in t["target"]) \
        or native_bf16()


def test_pipeline_workers_time_real_lfw_images(facekit_data):
    need(facekit_data / "lfw" / "pairs.txt")
    images = ep.lfw_images(facekit_data / "lfw", 3)
    runs = {label: [cpu_backends.run_worker(label, images)] for label in ("onnxruntime", "openvino")}
    for label, (run,) in runs.items():
        assert len(run["times_ms"]) == 3 and all(t > 0 for t in run["times_ms"])
        assert all(e is not None and len(e) == 128 for e in run["embeddings"]), label
    assert set(runs["openvino"][0]["providers"].values()) <= {"OpenVINO CPU f32", f"OpenVINO CPU bf16 ({native_bf16()})"}
    summary = cpu_backends.summarize_pipelines(runs, len(images))
    rows = {r["pipeline"]: r for r in summary["rows"]}
    assert rows["onnxruntime"]["speedup_vs_onnxruntime"] == 1.0
    assert rows["openvino"]["min_cos_vs_onnxruntime"] >= (0.99999 if not native_bf16() else 0.9999)


def test_targets_follow_the_measured_rows():
    thr = [{"backend": "openvino-cpu bf16", "batch": 32, "speedup_vs_ort_fp32": 5.0},
           {"backend": "openvino-cpu bf16", "batch": 1, "speedup_vs_ort_fp32": 1.5}]
    acc = [{"backend": "onnxruntime-cpu fp32", "LFW_accuracy": 0.9905, "CFP-FP_accuracy": 0.9071},
           {"backend": "openvino-cpu bf16", "parity_min_cos": 0.99995, "LFW_accuracy": 0.9903,
            "CFP-FP_accuracy": 0.9060},
           {"backend": "openvino-cpu f32", "parity_min_cos": 0.999999}]
    pipe = {"rows": [{"pipeline": "auto", "speedup_vs_onnxruntime": 2.1, "min_cos_vs_onnxruntime": 0.99999}]}
    got = {t["target"]: t for t in cpu_backends.targets({"throughput": thr, "accuracy_parity": acc, "pipeline": pipe})}
    holds = {k: v["holds"] for k, v in got.items()}
    assert holds["OpenVINO bf16 batch 32 ≥ 4.0× ONNX Runtime fp32"] is True
    assert holds["OpenVINO bf16 batch 1 ≥ 1.8× ONNX Runtime fp32"] is False
    assert holds["bf16 parity min cos ≥ 0.9999"] is True
    assert holds["bf16 LFW accuracy within 0.05 pt of ORT fp32"] is True
    assert holds["bf16 CFP-FP accuracy within 0.05 pt of ORT fp32"] is False
    assert got["bf16 CFP-FP accuracy within 0.05 pt of ORT fp32"]["value"] == pytest.approx(0.11)
    assert holds["OpenVINO f32 embeddings = ORT fp32 (cos ≥ 0.99999)"] is True
    assert holds["FacePipeline() ≥ 2× FacePipeline(backend='onnxruntime') per LFW image"] is True
    empty = cpu_backends.targets({"throughput": [], "accuracy_parity": [], "pipeline": {}})
    assert all(t["holds"] is None and t["not_measured"] for t in empty)

"""`python benchmarks/run.py` end to end: JSON last line, embeddings file, errors, parity, latency, caching."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, need

torch = pytest.importorskip("torch")

RUN = [sys.executable, str(ROOT / "benchmarks" / "run.py")]
EMBEDDING = 32


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    """A random-init MobileFaceNet: its checkpoint and its ONNX export with facekit metadata."""
    import onnx

    from runtime.metadata import encode_metadata
    from runtime.preprocess import RECOGNIZER_SPEC
    from train.backbones import build_backbone

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    model = build_backbone("mobilefacenet", EMBEDDING).eval()
    config = {"task": "recognition", "arch": "mobilefacenet", "embedding_size": EMBEDDING}
    ckpt = out / "mfn.pt"
    torch.save({"model": model.state_dict(), "config": config}, ckpt)
    path = out / "mfn.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}}, opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    for k, v in encode_metadata({"task": "recognition", "preprocess": RECOGNIZER_SPEC.to_dict(), "arch": "mobilefacenet",
                                 "embedding_size": EMBEDDING, "precision": "fp32"}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path, ckpt


def run(args, tmp_path, timeout=300):
    env = dict(os.environ, FACEKIT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    return subprocess.run(RUN + [str(a) for a in args] + ["--quiet"], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1])


def reference_embeddings(onnx_path, jpegs: list[bytes]) -> np.ndarray:
    """Independent flip-summed embeddings: decode, RGB, (x−127.5)/127.5, NCHW, model(x) + model(flip x), normalise."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = []
    for data in jpegs:
        rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32)
        x = ((rgb - 127.5) / 127.5).transpose(2, 0, 1)[None]
        e = sess.run(None, {"input": x})[0][0] + sess.run(None, {"input": np.ascontiguousarray(x[..., ::-1])})[0][0]
        out.append(e / np.linalg.norm(e))
    return np.asarray(out)


def test_bin_json_and_embeddings(facekit_data, recognizer, tmp_path):
    from evaluation.bin_format import load_bin_pickle
    from evaluation.verification import evaluate

    data = need(facekit_data / "photos" / "small_lfw.bin")
    model, _ = recognizer
    npz = tmp_path / "emb.npz"
    res = last_json(run(["bin", "--data", data, "--model", model, "--save-embeddings", npz, "--json"], tmp_path))
    for key in ("accuracy", "accuracy_std", "tar_at_far_1e-3", "best_threshold_cosine", "pairs"):
        assert key in res
    assert res["pairs"] == 10 and 0.0 <= res["accuracy"] <= 1.0
    assert res["best_threshold_cosine"] == pytest.approx(1 - res["best_threshold"] / 2, abs=1e-4)
    with np.load(npz) as z:
        assert set(z.files) == {"emb_a", "emb_b", "issame"}
        emb_a, emb_b, issame = z["emb_a"], z["emb_b"], z["issame"]
    assert emb_a.shape == emb_b.shape == (10, EMBEDDING) and issame.dtype == bool and issame.tolist() == [True] * 10
    assert np.allclose(np.linalg.norm(emb_a, axis=1), 1, atol=1e-5)
    bins, _ = load_bin_pickle(data)
    ref = reference_embeddings(model, bins)
    assert np.allclose(emb_a, ref[0::2], atol=2e-5) and np.allclose(emb_b, ref[1::2], atol=2e-5)
    assert res["accuracy"] == pytest.approx(evaluate(emb_a, emb_b, issame).accuracy)


def test_errors_are_one_line(facekit_data, recognizer, tmp_path):
    model, _ = recognizer
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")  # os.system("true")
    for args, pattern in (
        (["bin", "--data", evil, "--model", model], "refused"),
        (["bin", "--data", tmp_path / "missing.bin", "--model", model], "not found"),
        (["bin", "--data", need(facekit_data / "photos" / "small_lfw.bin"), "--model", tmp_path / "no.onnx"], "not found"),
        (["latency", "--batches", "1,eight"], "argument --batches: expected comma-separated int values, got '1,eight'"),
        (["gallery", "--indexes", "exact,flat"], "'flat' in 'exact,flat': each value must be one of exact, hnsw"),
        (["serve", "--concurrency", "4,0"], "0 in '4,0': each value must be at least 1"),
        (["throughput", "--data", tmp_path / "nowhere"], "LFW not found at"),
    ):
        proc = run(args, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert pattern in proc.stderr and "Traceback" not in proc.stderr


def test_default_run_without_shipped_model(tmp_path):
    from runtime.shipped import RECOGNIZER as SHIPPED_RECOGNIZER

    if SHIPPED_RECOGNIZER.is_file():
        pytest.skip("the shipped recognizer exists; the full default run is exercised by `python benchmarks/run.py`")
    proc = run(["--no-write"], tmp_path)
    assert proc.returncode != 0
    assert "no shipped recognizer" in proc.stderr and "Traceback" not in proc.stderr


def test_parity_against_pytorch(facekit_data, recognizer, tmp_path):
    data = need(facekit_data / "photos" / "small_lfw.bin")
    model, ckpt = recognizer
    res = last_json(run(["parity", "--kind", "bin", "--data", data, "--model", model, "--checkpoint", ckpt, "--json"],
                        tmp_path))
    rows = {r["backend"]: r for r in res["rows"]}
    assert res["reference"] == "pytorch-cpu fp32"
    assert rows["pytorch-cpu fp32"]["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    ort_row = rows["onnxruntime-cpu fp32"]
    assert ort_row["min_cosine"] > 0.9999 and ort_row["crops"] == 40  # 20 images and their flips
    assert ort_row["accuracy"] == pytest.approx(rows["pytorch-cpu fp32"]["accuracy"])
    assert any(r.get("skip_reason") for r in res["rows"])  # unavailable backends are listed with a reason


def test_latency(recognizer, tmp_path):
    model, _ = recognizer
    res = last_json(run(["latency", "--model", model, "--batches", "1,8", "--seconds", "0.2", "--no-pipeline",
                         "--json"], tmp_path))
    rows = res["latency"]
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["throughput_per_s"] > 0 and r["calls"] >= 5


def test_lfw_raw_photos_are_aligned_once_and_cached(facekit_data, recognizer, tmp_path):
    lfw = need(facekit_data / "lfw" / "pairs.txt").parent
    model, _ = recognizer
    args = ["lfw", "--data", lfw, "--model", model, "--pairs-per-fold", "1", "--json"]
    first = last_json(run(args, tmp_path))
    assert first["pairs"] == 20 and first["same_pairs"] == 10 and not first["crops_from_cache"]
    assert sum(first["crop_counts"].values()) == first["images"]
    assert first["fallbacks"] == first["crop_counts"].get("low_threshold", 0) + first["crop_counts"].get("centre_fallback", 0)
    assert len(list((tmp_path / "cache").glob("crops-lfw-*.npz"))) == 1
    second = last_json(run(args, tmp_path))
    assert second["crops_from_cache"] and second["accuracy"] == first["accuracy"]
    assert second["fold_thresholds"] == first["fold_thresholds"]


def test_landmarks_subcommand(facekit_data, tmp_path):
    aligner = ROOT / "runtime" / "models" / "aligner.onnx"
    if not aligner.is_file():
        pytest.skip("no shipped aligner (runtime/models/aligner.onnx) yet")
    src = need(facekit_data / "landmarks_300w" / "test")
    sample = tmp_path / "faces"
    sample.mkdir()
    for pts in sorted(src.glob("*.pts5"))[:4]:
        for f in (pts, pts.with_suffix(".jpg")):
            (sample / f.name).symlink_to(f)
    res = last_json(run(["landmarks", "--data", sample, "--json"], tmp_path))
    assert res["images"] + res.get("missed", 0) == 4
    for key in ("aligner", "detector"):
        assert 0 <= res[key]["nme"] < 1 and 0 <= res[key]["failure_rate"] <= 1
    proc = run(["landmarks", "--data", tmp_path / "nowhere"], tmp_path)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_common_options_before_or_after_the_subcommand(facekit_data, recognizer, tmp_path):
    """`run.py --model X bin …` must use X: the sub-command's own defaults may not overwrite options given
    before it (an argparse trap that silently benchmarked the shipped model instead)."""
    data = need(facekit_data / "photos" / "small_lfw.bin")
    model, _ = recognizer
    before, after = (tmp_path / "before.npz", tmp_path / "after.npz")
    last_json(run(["--model", model, "bin", "--data", data, "--save-embeddings", before, "--json"], tmp_path))
    last_json(run(["bin", "--data", data, "--model", model, "--save-embeddings", after, "--json"], tmp_path))
    with np.load(before) as a, np.load(after) as b:
        assert a["emb_a"].shape[1] == EMBEDDING  # the shipped recognizer is 128-d, the test model 32-d
        assert np.array_equal(a["emb_a"], b["emb_a"])


def test_training_report_writes_only_when_asked_and_a_partial_run_keeps_the_full_report(tmp_path):
    """`run.py training --no-write` writes nothing; `--only loader` writes `…-training-loader.*`, not the day's
    full `…-training.*` report."""
    from benchmarks.report import machine_info
    from benchmarks.training_throughput import PARTS, report_name

    info = machine_info()
    assert report_name(info, PARTS).endswith("-training")
    assert report_name(info, ("rec-open", "loader")).endswith("-training-loader-rec-open")
    results = tmp_path / "results"
    env = dict(os.environ, FACEKIT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    for extra in (["--no-write"], []):
        proc = subprocess.run(RUN + ["--results", str(results), "training", "--only", "loader", *extra],
                              capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "uint8 / float32" in proc.stdout
        if extra:
            assert not results.exists()
    assert sorted(p.name for p in results.iterdir()) == [f"{report_name(info, ['loader'])}.{ext}" for ext in ("json", "md")]

"""ONNX export: MobileFaceNet, iResNet-50 and the aligner, fp32 and fp16, checked against PyTorch in ONNX Runtime.

Parity inputs are real LFW faces (detected and warped by the runtime) when $FACEKIT_DATA is present, else
generated images. Random-init models get BatchNorm statistics estimated on those inputs (see
export.onnx_export.recalibrate_batchnorm) so their activations have realistic scale.
"""
from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from export import onnx_export as ox  # noqa: E402
from export import parity  # noqa: E402
from export.fp16 import to_fp16  # noqa: E402
from runtime.backends import load_model  # noqa: E402
from runtime.backends.base import onnx_backends  # noqa: E402
from runtime.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from runtime.metadata import preprocess_spec  # noqa: E402
from runtime.preprocess import to_model_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP32_MIN_COS = 0.99999
FP16_MIN_COS = 0.999

# (model, parity batch sizes): iResNet-50 at batch 64 costs ~40 s of CPU in PyTorch + ORT, so it is checked
# at 1 and 7 (the dynamic axis is the same code path; MobileFaceNet and the aligner cover batch 64).
CASES = {"mobilefacenet": (1, 7, 64), "iresnet50": (1, 7), "aligner": (1, 7, 64)}


def _source(name: str) -> ox.ModelSource:
    torch.manual_seed(0)
    if name == "aligner":
        return ox.aligner_source({})
    return ox.from_arch(name, 512, seed=0)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(source, fp32 path, fp16 path, crops, cached PyTorch reference, batches) for one model."""
    name = request.param
    src = _source(name)
    crops, how = parity.parity_crops(src.spec, max(CASES[name]), src.task, geometry=src.extra_metadata)
    ox.recalibrate_batchnorm(src.model, crops[:8], src.spec, batch=8)
    out = tmp_path_factory.mktemp(f"export-{name}")
    proto = ox.export_fp32(src)
    meta = ox.build_metadata(src, "fp32", ox.DEFAULT_OPSET)
    ox.set_metadata(proto, meta)
    fp32 = ox.save_onnx(proto, out / f"{name}.onnx")
    p16 = to_fp16(proto)
    ox.set_metadata(p16, {**meta, "precision": "fp16"})
    fp16 = ox.save_onnx(p16, out / f"{name}_fp16.onnx")
    reference = parity.memoize(lambda x: ox.torch_forward(src.model, x))
    return src, fp32, fp16, crops, reference, CASES[name], how


def test_fp32_parity(exported):
    src, fp32, _, crops, reference, batches, how = exported
    results = parity.check_parity(reference, OnnxRuntimeBackend(str(fp32), device="cpu").run, crops, src.spec, batches)
    assert [r.batch for r in results] == list(batches)
    for r in results:
        assert r.min_cos >= FP32_MIN_COS, (how, r)
        assert r.max_abs <= 1e-3 * r.ref_max_abs, (how, r)
    assert not parity.failures(results, parity.TOLERANCES["fp32"])


def test_fp16_parity_and_graph(exported):
    src, _, fp16, crops, reference, batches, how = exported
    proto = onnx.load(str(fp16))
    assert ox.precision_of(proto) == "fp16"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O kept fp32
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
    n16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert n16 > 0.9 * len([t for t in proto.graph.initializer if t.data_type in (1, 10)])
    backend = OnnxRuntimeBackend(str(fp16), device="cpu")
    results = parity.check_parity(reference, backend.run, crops, src.spec, batches)
    for r in results:
        assert r.min_cos >= FP16_MIN_COS, (how, r)
    out = backend.run(to_model_input(crops[:2], src.spec, color_order="BGR"))[0]
    assert out.dtype == np.float32


def test_graph_is_one_file_with_dynamic_batch(exported):
    src, fp32, _, _, _, _, _ = exported
    proto = onnx.load(str(fp32), load_external_data=False)
    onnx.checker.check_model(proto)
    assert ox.opset_of(proto) == ox.DEFAULT_OPSET
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in fp32.parent.iterdir()) == sorted([fp32.name, fp32.name.replace(".onnx", "_fp16.onnx")])
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and not dim0.HasField("dim_value")
    h, w = src.spec.input_size
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, h, w]
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_metadata_round_trips_through_the_runtime(exported):
    src, fp32, fp16, _, _, _, _ = exported
    for (path, precision), name in itertools.product(((fp32, "fp32"), (fp16, "fp16")), onnx_backends()):
        backend = load_model(str(path), backend=name)
        meta = backend.metadata
        assert meta == ox.read_metadata(path)
        assert meta["task"] == src.task and meta["precision"] == precision
        assert meta["arch"] == src.arch and meta["opset"] == ox.DEFAULT_OPSET
        assert preprocess_spec(meta) == src.spec
        assert meta["input_name"] == backend.input_name == ox.INPUT_NAME
        if src.task == "recognition":
            assert meta["embedding_size"] == 512 and backend.output_names == ["embedding"]
        else:
            assert meta["num_landmarks"] == 5 and meta["landmark_order"][0] == "left_eye"
            assert backend.output_names == ["heatmaps"]
            from runtime.landmarks import LandmarkRefiner

            refiner = LandmarkRefiner(str(path))  # the runtime's own consumer accepts the exported aligner
            assert tuple(refiner.geometry.input_size) == tuple(src.spec.input_size)


def test_batchnorm_recalibration_gives_sane_scale():
    src = ox.from_arch("mobilefacenet", 128, seed=1)
    crops = parity.synthetic_crops(8, (112, 112), seed=3)
    x = to_model_input(crops, src.spec, color_order="BGR")
    assert ox.recalibrate_batchnorm(src.model, crops, src.spec, batch=4) > 10
    after = ox.torch_forward(src.model, x)[0]
    assert 0.1 < np.abs(after).max() < 100 and after.std() > 0.05
    assert not src.model.training


def test_compare_outputs_detects_differences():
    a = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    assert parity.compare_outputs(a, a)[:2] == (0.0, pytest.approx(1.0))
    b = a.copy()
    b[2] = -b[2]
    max_abs, min_cos, _ = parity.compare_outputs(a, b)
    assert min_cos == pytest.approx(-1.0) and max_abs == pytest.approx(2 * np.abs(a[2]).max())
    assert parity.compare_outputs(a, np.full_like(a, np.nan))[1] == float("-inf")
    res = [parity.ParityResult(1, 0.5, 0.9, 0.95, 1.0)]
    assert len(parity.failures(res, parity.Tolerance(0.99, 0.1))) == 2
    assert parity.parity_line(res) == "parity: max_abs=0.5 min_cos=0.9000000000"


def _crop_dir(tmp_path: Path, n: int = 8) -> Path:
    import cv2

    d = tmp_path / "faces"
    d.mkdir()
    for i, c in enumerate(parity.synthetic_crops(n, (112, 112), seed=5)):
        cv2.imwrite(str(d / f"{i}.png"), c)
    return d


def test_cli_prints_parity_last_line(tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.run(
        [sys.executable, "export/to_onnx.py", "--arch", "mobilefacenet", "--embedding-size", "128", "--out", str(out),
         "--batch", "1,3", "--faces", str(_crop_dir(tmp_path)), "--threshold", "0.31"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"parity: max_abs=(\S+) min_cos=(\S+)", last)
    assert m, last
    assert float(m.group(1)) < 1e-3 and float(m.group(2)) >= FP32_MIN_COS
    meta = ox.read_metadata(out)
    assert meta["weights"] == "random-init" and meta["embedding_size"] == 128
    assert meta["threshold_cosine"] == pytest.approx(0.31)


def test_checkpoint_export_and_rejection(tmp_path):
    from export import to_onnx
    from train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = ox.from_arch("mobilefacenet", 128).model
    config = {"task": "recognition", "arch": "mobilefacenet", "embedding_size": 128, "threshold_cosine": 0.27}
    ckpt = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": config, "step": 1})
    faces = _crop_dir(tmp_path)
    out = tmp_path / "ok.onnx"
    assert to_onnx.main(["--checkpoint", str(ckpt), "--out", str(out), "--batch", "2", "--faces", str(faces)]) == 0
    meta = ox.read_metadata(out)
    assert meta["checkpoint_sha256"] == ox.sha256_file(ckpt) and meta["weights"] == "checkpoint"
    assert meta["threshold_cosine"] == pytest.approx(0.27)
    # an impossible tolerance: non-zero exit and no file left behind
    bad = tmp_path / "bad.onnx"
    rc = to_onnx.main(["--checkpoint", str(ckpt), "--out", str(bad), "--batch", "2", "--faces", str(faces),
                       "--min-cos", "1.5"])
    assert rc == 1 and not bad.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.")]  # temp files cleaned up
    # a missing checkpoint: one-line error, non-zero exit
    assert to_onnx.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(bad)]) == 1
    json.dumps(meta)  # metadata stays plain JSON


def test_fp16_weight_storage_halves_the_file_and_keeps_fp32_outputs(tmp_path):
    """with_fp16_weights: large weights stored fp16 (cast back at load), small ones fp32; ONNX Runtime
    gives the fp32 model's outputs up to the fp16 rounding of the weights; weights beyond fp16 are refused."""
    import onnx
    from onnx import numpy_helper

    from export.fp16 import with_fp16_weights
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from tests.test_pipeline import make_recognizer

    src = make_recognizer(tmp_path / "fp32.onnx")
    proto = onnx.load(str(src))
    small = with_fp16_weights(proto, min_elements=64)
    onnx.save(small, str(tmp_path / "fp16w.onnx"))
    assert (tmp_path / "fp16w.onnx").stat().st_size < 0.6 * src.stat().st_size
    assert {t.data_type for t in small.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(0).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)
    a = OnnxRuntimeBackend(str(src), device="cpu").run(x)[0]
    b = OnnxRuntimeBackend(str(tmp_path / "fp16w.onnx"), device="cpu").run(x)[0]
    assert b.dtype == np.float32 and np.abs(a - b).max() < 5e-3 * np.abs(a).max()
    assert {t.data_type for t in with_fp16_weights(proto, min_elements=10**6).graph.initializer} == {onnx.TensorProto.FLOAT}
    big = onnx.ModelProto()
    big.CopyFrom(proto)
    w = numpy_helper.to_array(big.graph.initializer[0]).copy()
    w.flat[0] = 1e6
    big.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, big.graph.initializer[0].name))
    with pytest.raises(ValueError, match="fp16 range"):
        with_fp16_weights(big)


def test_checkpoint_export_with_fp16_weight_storage(tmp_path):
    """--fp16-weights: about half the file of the fp32 export, fp32 parity within its tolerance, and the
    metadata says how the weights are stored without losing where they came from."""
    from export import to_onnx
    from train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = ox.from_arch("mobilefacenet", 128).model
    config = {"task": "recognition", "arch": "mobilefacenet", "embedding_size": 128}
    ckpt = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "config": config, "step": 1})
    faces = _crop_dir(tmp_path)
    full, half = tmp_path / "fp32.onnx", tmp_path / "fp16w.onnx"
    for out, extra in ((full, []), (half, ["--fp16-weights"])):
        assert to_onnx.main(["--checkpoint", str(ckpt), "--out", str(out), "--batch", "2", "--faces", str(faces),
                             *extra]) == 0
    assert half.stat().st_size < 0.6 * full.stat().st_size
    meta = ox.read_metadata(half)
    assert meta["weight_storage"] == "fp16" and meta["weights"] == "checkpoint" and meta["precision"] == "fp32"

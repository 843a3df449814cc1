"""export/to_triton.py: every config.pbtxt parses with Triton's ModelConfig schema and says what the model is
(names, dtypes, dims, batch axis checked against ONNX Runtime's view of the file), engines become
tensorrt_plan models with cc_model_filenames, and the repository is written atomically. No server needed."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (the triton extra) is not installed")
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from export import to_triton  # noqa: E402
from export.trt_build import BuildOptions, wanted_build  # noqa: E402
from export.triton_repository import (PYTHON_MODEL_SOURCE, ServingOptions, TritonExportError,  # noqa: E402
                                      config_message, parse_pbtxt, plan_repository, write_repository)
from runtime.backends.tensorrt import make_sidecar, sidecar_path  # noqa: E402
from runtime import shipped  # noqa: E402
from runtime.detector import DEFAULT_DETECTOR  # noqa: E402
from runtime.metadata import encode_metadata  # noqa: E402
from runtime.pipeline import DEFAULT_RECOGNIZER  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

ORT_TYPES = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(float16)": model_config_pb2.TYPE_FP16,
             "tensor(int64)": model_config_pb2.TYPE_INT64, "tensor(uint8)": model_config_pb2.TYPE_UINT8}


def _fixed_batch_onnx(path: Path) -> Path:
    """A graph with a fixed batch of 1 and a dynamic spatial size: Triton must not batch it."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[2, 3], keepdims=0)],
                              "fixed", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, encode_metadata({"task": "detection", "arch": "fixed-test"}))
    path.write_bytes(model.SerializeToString())
    return path


def _assert_config_matches_onnx(config, onnx_path: Path) -> None:
    """Names, dtypes, dims and batch axis of ``config`` against ONNX Runtime's view of the file."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ins, outs = sess.get_inputs(), sess.get_outputs()
    batched = all(isinstance(t.shape[0], str) for t in ins + outs)
    assert (config.max_batch_size > 0) == batched
    for declared, actual in ((config.input, ins), (config.output, outs)):
        assert [t.name for t in declared] == [t.name for t in actual]
        for d, a in zip(declared, actual):
            assert d.data_type == ORT_TYPES[a.type], d.name
            want = [v if isinstance(v, int) else -1 for v in (a.shape[1:] if batched else a.shape)]
            assert list(d.dims) == want, d.name
    props = sess.get_modelmeta().custom_metadata_map
    if "facekit" in props:
        assert config.parameters["facekit"].string_value == props["facekit"]
    else:
        assert "facekit" not in config.parameters


def _read(repo: Path, name: str):
    text = (repo / name / "config.pbtxt").read_text()
    assert text.startswith(f"# {name}: derived from ")
    return parse_pbtxt(text)


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_configs_parse_with_triton_schema_and_match_onnx(tmp_path, backend):
    repo = tmp_path / "repo"
    assert to_triton.main(["--recognizer", str(DEFAULT_RECOGNIZER), "--detector", str(DEFAULT_DETECTOR),
                           "--out", str(repo), "--backend", backend, "--max-batch", "16"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["detector", "face_pipeline", "recognizer"]
    for name in ("recognizer", "detector"):
        config = _read(repo, name)
        assert config.name == name and config.backend == backend
        _assert_config_matches_onnx(config, repo / name / "1" / "model.onnx")
        assert config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 1000
        group = config.instance_group[0]
        assert group.count == 1
        assert group.kind == (model_config_pb2.ModelInstanceGroup.KIND_CPU if backend == "python"
                              else model_config_pb2.ModelInstanceGroup.KIND_AUTO)
        if backend == "python":
            assert (repo / name / "1" / "model.py").read_bytes() == PYTHON_MODEL_SOURCE.read_bytes()
            assert config.parameters["facekit_model"].string_value == "onnx"
    pipe = _read(repo, "face_pipeline")
    assert pipe.backend == "python" and pipe.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in pipe.input] == [("image", [-1])]
    assert [(t.name, list(t.dims)) for t in pipe.output] == [
        ("boxes", [-1, 4]), ("scores", [-1]), ("landmarks", [-1, 5, 2]), ("embeddings", [-1, 128])]
    assert pipe.parameters["facekit"].string_value == _read(repo, "recognizer").parameters["facekit"].string_value
    bls = json.loads(pipe.parameters["recognizer"].string_value)
    assert bls == {"model": "recognizer", "input": "input", "data_type": "TYPE_FP32", "dims": [-1, 3, 150, 150],
                   "outputs": ["embedding"], "output_dims": [[-1, 128]], "max_batch_size": 16}
    assert (repo / "face_pipeline" / "1" / "detector.onnx").read_bytes() == DEFAULT_DETECTOR.read_bytes()


def test_fixed_batch_model_is_not_batched(tmp_path):
    src = _fixed_batch_onnx(tmp_path / "fixed.onnx")
    repo = write_repository(tmp_path / "repo", plan_repository(src, pipeline=False))
    config = _read(repo, "recognizer")
    _assert_config_matches_onnx(config, src)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, -1, -1]
    assert not config.HasField("dynamic_batching")


def test_face_pipeline_needs_the_recognizer_metadata(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["embedding"])], "bare", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "bare.onnx"
    path.write_bytes(model.SerializeToString())
    assert "facekit" not in plan_repository(path, pipeline=False)[0].config["parameters"]
    with pytest.raises(TritonExportError, match="bare.onnx: no facekit metadata"):
        plan_repository(path, pipeline=True)


def test_schema_rejects_unknown_fields_and_wrong_types():
    with pytest.raises(text_format.ParseError):
        parse_pbtxt('name: "x"\nmax_batch_size: 4\nbatching_magic: true\n')
    with pytest.raises(text_format.ParseError):
        parse_pbtxt('name: "x"\nmax_batch_size: "four"\n')
    with pytest.raises(TritonExportError, match="not a valid Triton config"):
        config_message({"name": "x", "instance_group": [{"kind": "KIND_TPU"}]})


def test_ort_tensorrt_acceleration_and_instances(tmp_path):
    opts = ServingOptions(ort_tensorrt="fp16", instances=3, kind="gpu", preferred_batch=(8, 24), max_batch=24)
    config = config_message(plan_repository(DEFAULT_RECOGNIZER, opts=opts, pipeline=False)[0].config)
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"] and accel[0].parameters["precision_mode"] == "FP16"
    assert config.instance_group[0].count == 3
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 24]


def _engine(folder: Path, onnx_path: Path, cc: str, profile=(1, 16, 64), payload: bytes | None = None) -> Path:
    """An engine file and its sidecar as export/to_trt.py writes them (the bytes are not a real plan:
    the config is derived from the sidecar and the source ONNX, never from the plan itself)."""
    env = {"tensorrt_version": "10.13.0.35", "gpu_name": f"GPU sm{cc}", "compute_capability": cc}
    build = wanted_build(onnx_path, BuildOptions(*profile), env)
    payload = payload or f"plan for sm{cc}".encode()
    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / f"recognizer.sm{cc.replace('.', '')}.engine"
    engine.write_bytes(payload)
    side = make_sidecar(build, payload, {"task": "recognition", "arch": "from-sidecar"})
    Path(sidecar_path(engine)).write_text(json.dumps(side))
    return engine


def test_engines_become_tensorrt_plan_with_cc_model_filenames(tmp_path):
    engines = [_engine(tmp_path, DEFAULT_RECOGNIZER, "8.6", (1, 16, 64)),
               _engine(tmp_path, DEFAULT_RECOGNIZER, "9.0", (1, 32, 128))]
    repo = tmp_path / "repo"
    assert to_triton.main(["--recognizer", str(DEFAULT_RECOGNIZER), "--engine", str(engines[0]),
                           "--engine", str(engines[1]), "--out", str(repo)]) == 0
    config = _read(repo, "recognizer")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"8.6": "model.sm86.plan", "9.0": "model.sm90.plan"}
    assert (repo / "recognizer" / "1" / "model.sm90.plan").read_bytes() == engines[1].read_bytes()
    assert not (repo / "recognizer" / "1" / "model.onnx").exists()
    assert config.max_batch_size == 64  # the smallest profile max: every GPU's plan accepts it
    assert {16, 32, 64} <= set(config.dynamic_batching.preferred_batch_size)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert json.loads(config.parameters["facekit"].string_value)["arch"] == "from-sidecar"
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [3, 150, 150])]
    bls = json.loads(_read(repo, "face_pipeline").parameters["recognizer"].string_value)
    assert bls["max_batch_size"] == 64


def test_engine_problems_are_refused(tmp_path):
    foreign = _engine(tmp_path / "int8", shipped.RECOGNIZER_INT8, "8.0")
    with pytest.raises(TritonExportError, match="none of"):
        plan_repository(DEFAULT_RECOGNIZER, engines=[foreign])
    tampered = _engine(tmp_path, DEFAULT_RECOGNIZER, "8.9")
    tampered.write_bytes(b"replaced")
    with pytest.raises(TritonExportError, match="does not match its sidecar"):
        plan_repository(DEFAULT_RECOGNIZER, engines=[tampered])
    with pytest.raises(TritonExportError, match="min batch must be 1"):
        plan_repository(DEFAULT_RECOGNIZER, engines=[_engine(tmp_path, DEFAULT_RECOGNIZER, "7.5", (2, 16, 64))])
    twins = [_engine(tmp_path / "a", DEFAULT_RECOGNIZER, "8.0"),
             _engine(tmp_path / "b", DEFAULT_RECOGNIZER, "8.0", payload=b"another sm80 plan")]
    with pytest.raises(TritonExportError, match="same compute capability"):
        plan_repository(DEFAULT_RECOGNIZER, engines=twins)


def test_existing_repository_needs_force_and_is_replaced_whole(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "stale_model").mkdir(parents=True)
    args = ["--recognizer", str(DEFAULT_RECOGNIZER), "--out", str(repo), "--no-pipeline"]
    assert to_triton.main(args) == 2
    assert "--force" in capsys.readouterr().err and (repo / "stale_model").is_dir()
    assert to_triton.main(args + ["--force"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["recognizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no temp folders left
    assert to_triton.main(["--recognizer", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "r2")]) == 2
    assert "ONNX file not found" in capsys.readouterr().err
    msg = config_message(json_format.MessageToDict(_read(repo, "recognizer"), preserving_proto_field_name=True))
    assert msg.name == "recognizer" and np.all(np.asarray(msg.input[0].dims) > 0)


_WRITER = """
import sys
from export.triton_repository import ServingOptions, plan_repository, write_repository
repo, model = sys.argv[1], sys.argv[2]
plans = [plan_repository(model, opts=ServingOptions(max_batch=batch), pipeline=False) for batch in (16, 32)]
for i in range(10 ** 6):
    write_repository(repo, plans[i % 2], force=True)
    print("written", flush=True)
"""


def test_killed_writers_leave_a_whole_repository_and_nothing_that_outlives_the_next_write(tmp_path):
    repo, recognizer = tmp_path / "repo", DEFAULT_RECOGNIZER.read_bytes()
    rng, mid_write = random.Random(0), 0
    for _ in range(10):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(repo), str(DEFAULT_RECOGNIZER)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline() == "written\n"
            start = time.perf_counter()
            assert writer.stdout.readline() == "written\n"
            time.sleep(rng.uniform(0, time.perf_counter() - start))  # anywhere in a write
        finally:
            writer.kill()  # SIGKILL
            writer.wait(timeout=30)
        assert sorted(p.name for p in repo.iterdir()) == ["recognizer"]
        assert _read(repo, "recognizer").max_batch_size in (16, 32)
        assert (repo / "recognizer" / "1" / "model.onnx").read_bytes() == recognizer
        mid_write += any(p.name.startswith(".repo.") for p in tmp_path.iterdir())
    assert mid_write, "no kill landed while a repository was being written"
    write_repository(repo, plan_repository(DEFAULT_RECOGNIZER, pipeline=False), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]

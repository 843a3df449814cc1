"""A Triton Inference Server model repository derived from facekit models (ONNX files, TensorRT engines).

Each model becomes ``<name>/config.pbtxt`` plus ``<name>/1/<file>``. Every config field comes from the model
itself, never from a template: input/output names, dtypes and dims from ONNX Runtime's view of the graph (an
engine's from the ONNX it was built from, matched by SHA-256), ``max_batch_size`` from the dynamic batch axis
(the serving limit for ONNX, the optimization profile's max for engines), and the facekit metadata as config
``parameters`` (key ``facekit``, the same JSON the model file carries). Configs are built as Triton's own
``ModelConfig`` protobuf (``tritonclient``'s ``model_config_pb2``), so a field Triton does not know cannot be
written. Python-backend models (``face_pipeline``, and ONNX models served by facekit's runtime: the CPU route)
get :mod:`export.triton_python_model` as their ``model.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.backends.tensorrt import read_sidecar, sidecar_problems
from runtime.detector import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, DEFAULT_SCORE_THRESHOLD
from runtime.field_options import comma_list, option
from runtime.files import existing_file, pid_temp_prefix, publish_folder, remove_stale_temporaries, sha256_file
from runtime.metadata import METADATA_KEY
from runtime.optional_imports import require_module

PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "triton_python_model.py"
INSTALL_HINT = "export for Triton needs tritonclient: pip install 'facekit[triton]'"
#: ONNX Runtime tensor types → Triton config data types.
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
                 "tensor(bfloat16)": "TYPE_BF16", "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
                 "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(uint8)": "TYPE_UINT8",
                 "tensor(uint16)": "TYPE_UINT16", "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
                 "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}
BACKENDS = ("onnxruntime", "python")
KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
ORT_TENSORRT = ("off", "fp32", "fp16")


class TritonExportError(ValueError):
    """A model cannot be put into a Triton repository as asked (one line: which file, and why)."""


def model_config_pb2():
    """Triton's model-config protobuf module (from tritonclient), or :class:`TritonExportError`."""
    return require_module("tritonclient.grpc.model_config_pb2", TritonExportError, INSTALL_HINT)


# ------------------------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, Triton data type, and ONNX Runtime's shape (int, or str/None when dynamic)."""

    name: str
    data_type: str
    shape: tuple


@dataclass(frozen=True)
class Signature:
    """A model's inputs, outputs and metadata entries, as ONNX Runtime sees the file."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    raw_metadata: dict = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        """True when every input and output has a dynamic first axis (the batch axis Triton batches on)."""
        return all(t.shape and not isinstance(t.shape[0], int) for t in self.inputs + self.outputs)


def onnx_signature(path: str | os.PathLike) -> Signature:
    """The signature of an ONNX file as the runtime's ONNX Runtime backend sees it (its shape inference
    fills axes the graph leaves symbolic, e.g. RetinaFace's 4 / 2 / 10 output columns)."""
    model = OnnxRuntimeBackend(str(path), device="cpu")

    def spec(t) -> TensorSpec:
        if t.type not in ORT_TO_TRITON:
            raise TritonExportError(f"{path}: tensor {t.name!r} has type {t.type}, which Triton cannot serve")
        return TensorSpec(t.name, ORT_TO_TRITON[t.type], tuple(t.shape))

    return Signature(tuple(spec(t) for t in model.session.get_inputs()),
                     tuple(spec(t) for t in model.session.get_outputs()), dict(model.raw_metadata))


def config_dims(shape: tuple, batched: bool) -> list[int]:
    """Config ``dims``: the shape without the batch axis when batched, dynamic axes as -1."""
    rest = shape[1:] if batched else shape
    return [d if isinstance(d, int) and d > 0 else -1 for d in rest]


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ServingOptions:
    """How the models are served: batching, instances, acceleration (the CLI's options)."""

    max_batch: int = option(32, "max_batch_size of dynamic-batch ONNX models")
    #: None: powers of two from 4 up to the max batch
    preferred_batch: tuple[int, ...] | None = option(None, "dynamic batcher's preferred sizes, e.g. 8,16,32",
                                                     shown="powers of two from 4, and the max",
                                                     type=comma_list(int, minimum=1))
    queue_delay_us: int = option(1000, "dynamic batcher's max queue delay (µs)")
    instances: int = option(1, "instances of each model (instance_group count)")
    kind: str = option("auto", "instance kind of onnxruntime models (engines: gpu; Python-backend models: cpu)",
                       choices=tuple(KINDS))
    ort_tensorrt: str = option("off", "ONNX models: let ONNX Runtime run them through TensorRT on the GPU "
                                      "(optimization.execution_accelerators)", choices=ORT_TENSORRT)
    pipeline_instances: int = option(2, "face_pipeline instances")
    score_threshold: float = option(DEFAULT_SCORE_THRESHOLD, "face_pipeline: detector score threshold")
    #: face_pipeline embeds face + mirror image, summed (the help describes the switch, ``--no-flip-test``)
    flip_test: bool = option(True, "face_pipeline: embed each face once (default: face + mirror image, summed)")

    def __post_init__(self):
        if self.max_batch < 1 or self.instances < 1 or self.pipeline_instances < 1 or self.queue_delay_us < 0:
            raise TritonExportError("max batch and instance counts must be ≥ 1, the queue delay ≥ 0")
        if self.kind not in KINDS:
            raise TritonExportError(f"instance kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.ort_tensorrt not in ORT_TENSORRT:
            raise TritonExportError(f"ort_tensorrt must be one of {ORT_TENSORRT}, got {self.ort_tensorrt!r}")


def dynamic_batching(max_batch_size: int, opts: ServingOptions, extra: tuple[int, ...] = ()) -> dict:
    """The ``dynamic_batching`` section: preferred sizes (≤ ``max_batch_size``) and the queue delay."""
    wanted = opts.preferred_batch or tuple(b for b in (4, 8, 16, 32, 64, 128, 256) if b < max_batch_size)
    sizes = sorted({b for b in (*wanted, *extra, max_batch_size) if 1 <= b <= max_batch_size})
    return {"preferred_batch_size": sizes, "max_queue_delay_microseconds": int(opts.queue_delay_us)}


def _tensors(specs: tuple[TensorSpec, ...], batched: bool) -> list[dict]:
    return [{"name": t.name, "data_type": t.data_type, "dims": config_dims(t.shape, batched)} for t in specs]


def _parameters(values: dict[str, str]) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _facekit_parameters(sig: Signature) -> dict[str, str]:
    return {METADATA_KEY: sig.raw_metadata[METADATA_KEY]} if METADATA_KEY in sig.raw_metadata else {}


def _io_section(sig: Signature, max_batch_size: int, opts: ServingOptions, extra: tuple[int, ...] = ()) -> dict:
    section = {"max_batch_size": max_batch_size, "input": _tensors(sig.inputs, max_batch_size > 0),
               "output": _tensors(sig.outputs, max_batch_size > 0)}
    if max_batch_size > 0:
        section["dynamic_batching"] = dynamic_batching(max_batch_size, opts, extra)
    return section


# --------------------------------------------------------------------------------------------- configs


def onnx_config(name: str, sig: Signature, opts: ServingOptions, backend: str = "onnxruntime") -> dict:
    """The config (``ModelConfig`` in JSON form) of an ONNX model on ONNX Runtime, or on facekit's runtime
    in Triton's Python backend (``backend="python"``, the CPU route)."""
    if backend not in BACKENDS:
        raise TritonExportError(f"backend must be one of {BACKENDS}, got {backend!r}")
    max_batch_size = opts.max_batch if sig.batched else 0
    config: dict[str, Any] = {"name": name, "backend": backend, **_io_section(sig, max_batch_size, opts)}
    params = _facekit_parameters(sig)
    if backend == "python":
        config["instance_group"] = [{"kind": "KIND_CPU", "count": opts.instances}]
        params.update(facekit_model="onnx", model_file="model.onnx")
    else:
        config["default_model_filename"] = "model.onnx"
        config["instance_group"] = [{"kind": KINDS[opts.kind], "count": opts.instances}]
        if opts.ort_tensorrt != "off":
            accel = {"name": "tensorrt", "parameters": {"precision_mode": opts.ort_tensorrt.upper(),
                                                         "max_workspace_size_bytes": str(1 << 30)}}
            config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accel]}}
    config["parameters"] = _parameters(params)
    return config


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine with its checked sidecar, as one compute capability's plan of a model."""

    path: Path
    sidecar: dict

    @property
    def compute_capability(self) -> str:
        return str(self.sidecar["build"]["compute_capability"])

    @property
    def file_name(self) -> str:
        return f"model.sm{self.compute_capability.replace('.', '')}.plan"

    @property
    def batch_profile(self) -> tuple[int, int, int]:
        p = self.sidecar["build"]["profile"]
        return int(p["min"][0]), int(p["opt"][0]), int(p["max"][0])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Engine":
        """Read and check an engine's sidecar (format, key, engine hash); :class:`TritonExportError` if bad."""
        path = existing_file(path, TritonExportError, "engine file")
        try:
            side = read_sidecar(path)
        except RuntimeError as e:
            raise TritonExportError(str(e)) from None
        problems = sidecar_problems(side, engine_bytes=path.read_bytes())
        if problems:
            raise TritonExportError(f"{path}: " + "; ".join(problems))
        return cls(path, side)


def engine_config(name: str, sig: Signature, engines: list[Engine], opts: ServingOptions) -> dict:
    """The ``tensorrt_plan`` config of one model built as engines for one or more compute capabilities:
    ``cc_model_filenames`` maps each capability to its plan; ``max_batch_size`` is the smallest profile max."""
    ccs = [e.compute_capability for e in engines]
    if len(set(ccs)) != len(ccs):
        raise TritonExportError(f"{name}: two engines for the same compute capability ({ccs})")
    low = [str(e.path) for e in engines if e.batch_profile[0] != 1]
    if low:
        raise TritonExportError(f"{low[0]}: the profile's min batch must be 1 (Triton sends batches from 1); "
                                "rebuild with --min-batch 1")
    max_batch_size = min(e.batch_profile[2] for e in engines) if sig.batched else 0
    opt = tuple(e.batch_profile[1] for e in engines)
    config: dict[str, Any] = {"name": name, "platform": "tensorrt_plan", "backend": "tensorrt",
                              **_io_section(sig, max_batch_size, opts, opt)}
    config["cc_model_filenames"] = {e.compute_capability: e.file_name for e in engines}
    config["instance_group"] = [{"kind": "KIND_GPU", "count": opts.instances}]
    meta = engines[0].sidecar.get("facekit") or {}
    params = {METADATA_KEY: json.dumps(meta, sort_keys=True)} if meta else _facekit_parameters(sig)
    config["parameters"] = _parameters(params)
    return config


def face_pipeline_config(recognizer: dict, detector_file: str, opts: ServingOptions) -> dict:
    """The ``face_pipeline`` Python-backend model: encoded image bytes in (UINT8 [-1]); boxes, scores,
    landmarks and embeddings of every face out; the recognizer is called through BLS."""
    batched = recognizer["max_batch_size"] > 0
    emb = recognizer["output"][0]
    size = emb["dims"][-1]
    bls = {"model": recognizer["name"], "input": recognizer["input"][0]["name"],
           "data_type": recognizer["input"][0]["data_type"],
           "dims": ([-1] if batched else []) + list(recognizer["input"][0]["dims"]),
           "outputs": [o["name"] for o in recognizer["output"]],
           "output_dims": [([-1] if batched else []) + list(o["dims"]) for o in recognizer["output"]],
           "max_batch_size": recognizer["max_batch_size"]}
    params = {"facekit_model": "face_pipeline", "recognizer": json.dumps(bls, sort_keys=True),
              "detector": detector_file, "score_threshold": str(opts.score_threshold),
              "flip_test": "true" if opts.flip_test else "false",
              "max_side": str(DEFAULT_MAX_SIDE), "min_side": str(DEFAULT_MIN_SIDE)}
    if METADATA_KEY in recognizer["parameters"]:
        params[METADATA_KEY] = recognizer["parameters"][METADATA_KEY]["string_value"]
    return {
        "name": "face_pipeline", "backend": "python", "max_batch_size": 0,
        "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1]}],
        "output": [{"name": "boxes", "data_type": "TYPE_FP32", "dims": [-1, 4]},
                   {"name": "scores", "data_type": "TYPE_FP32", "dims": [-1]},
                   {"name": "landmarks", "data_type": "TYPE_FP32", "dims": [-1, 5, 2]},
                   {"name": "embeddings", "data_type": "TYPE_FP32", "dims": [-1, size]}],
        "instance_group": [{"kind": "KIND_CPU", "count": opts.pipeline_instances}],
        "parameters": _parameters(params),
    }


# ------------------------------------------------------------------------------------------ pbtxt text


def config_message(config: dict):
    """``config`` as Triton's ``ModelConfig`` message; unknown fields or wrong types raise TritonExportError."""
    from google.protobuf import json_format

    pb = model_config_pb2()
    try:
        return json_format.ParseDict(config, pb.ModelConfig())
    except json_format.ParseError as e:
        raise TritonExportError(f"model {config.get('name')!r}: not a valid Triton config ({e})") from None


def to_pbtxt(config: dict, header: str = "") -> str:
    """The ``config.pbtxt`` text of ``config`` (``header`` lines become ``#`` comments)."""
    from google.protobuf import text_format

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + text_format.MessageToString(config_message(config))


def parse_pbtxt(text: str):
    """Parse ``config.pbtxt`` text with Triton's schema (``ModelConfig``); raises on unknown fields."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


# ----------------------------------------------------------------------------------------- repository


@dataclass
class RepositoryModel:
    """One model folder: its config, the files of version 1 (name → source file), and where it came from."""

    name: str
    config: dict
    files: dict[str, Path]
    origin: str


def _engines_by_source(engines: list[Engine], sources: dict[str, Path]) -> dict[str, list[Engine]]:
    """Engines grouped by the model (key of ``sources``) whose ONNX file they were built from (SHA-256)."""
    by_sha = {sha256_file(path): role for role, path in sources.items()}
    grouped: dict[str, list[Engine]] = {}
    for engine in engines:
        role = by_sha.get(engine.sidecar["build"].get("onnx_sha256"))
        if role is None:
            raise TritonExportError(f"{engine.path}: built from an ONNX file that is none of "
                                    f"{sorted(sources)} (sha256 {engine.sidecar['build'].get('onnx_sha256')}); "
                                    "pass the ONNX it was built from")
        grouped.setdefault(role, []).append(engine)
    return grouped


def _origin(name: str, path: Path, extra: str = "") -> str:
    return (f"{name}: derived from {path.name} (sha256 {sha256_file(path)}) by export/to_triton.py{extra}; "
            "regenerate instead of editing")


def plan_repository(recognizer: str | os.PathLike, detector: str | os.PathLike | None = None,
                    engines: list[str | os.PathLike] = (), opts: ServingOptions = ServingOptions(),
                    backend: str = "onnxruntime", pipeline: bool = True) -> list[RepositoryModel]:
    """The models of a repository: ``recognizer`` (and ``detector``) as ONNX Runtime, Python-backend
    (``backend="python"``) or TensorRT models (when ``engines`` built from them are given), plus
    ``face_pipeline`` unless ``pipeline`` is False."""
    sources = {"recognizer": Path(recognizer)}
    if detector is not None:
        sources["detector"] = Path(detector)
    for path in sources.values():
        existing_file(path, TritonExportError, "ONNX file")
    grouped = _engines_by_source([Engine.load(e) for e in engines], sources)
    models = []
    for name, path in sources.items():
        sig = onnx_signature(path)
        if name in grouped:
            config = engine_config(name, sig, grouped[name], opts)
            files = {e.file_name: e.path for e in grouped[name]}
            origin = _origin(name, path, " with engines " + ", ".join(e.path.name for e in grouped[name]))
        else:
            config = onnx_config(name, sig, opts, backend)
            files = {"model.onnx": path, **({"model.py": PYTHON_MODEL_SOURCE} if backend == "python" else {})}
            origin = _origin(name, path)
        models.append(RepositoryModel(name, config, files, origin))
    if pipeline:
        rec = models[0]
        if METADATA_KEY not in rec.config["parameters"]:
            raise TritonExportError(f"{recognizer}: no facekit metadata, so face_pipeline cannot know its "
                                    "preprocessing; export it with export/to_onnx.py")
        files = {"model.py": PYTHON_MODEL_SOURCE}
        if detector is not None:
            files["detector.onnx"] = Path(detector)
        config = face_pipeline_config(rec.config, "detector.onnx" if detector is not None else "", opts)
        models.append(RepositoryModel("face_pipeline", config, files,
                                      _origin("face_pipeline", Path(recognizer), " (recognizer metadata)")))
    return models


def write_repository(out: str | os.PathLike, models: list[RepositoryModel], force: bool = False) -> Path:
    """Write the repository into a temp folder beside ``out``, then put it in place in one step
    (:func:`runtime.files.publish_folder`): ``out`` is either the previous repository or the complete new one.
    An existing non-empty ``out`` needs ``force``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise TritonExportError(f"{out}: exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # folders of writers killed before they were done
    tmp = Path(tempfile.mkdtemp(prefix=pid_temp_prefix(out), suffix=".tmp", dir=out.parent))
    try:
        for m in models:
            version = tmp / m.name / "1"
            version.mkdir(parents=True)
            text = to_pbtxt(m.config, m.origin)
            parse_pbtxt(text)  # what Triton will read back
            (tmp / m.name / "config.pbtxt").write_text(text, encoding="utf-8")
            for file_name, src in m.files.items():
                shutil.copyfile(src, version / file_name)
        return publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Triton Python-backend models that run facekit's runtime; ``export/to_triton.py`` copies this file as ``model.py``.

The config parameter ``facekit_model`` says which model a copy serves:

- ``onnx``: the version folder's ONNX file (parameter ``model_file``) run by ``runtime.backends.load_model``,
  the runtime's own ONNX Runtime backend (the CPU route, for servers without Triton's onnxruntime backend).
  The requests the dynamic batcher hands over in one call run as one batch.
- ``face_pipeline``: encoded image bytes in (``image``, UINT8 [-1]); ``boxes``, ``scores``, ``landmarks`` and
  ``embeddings`` of every face out, best score first. Detection and warping run here (``runtime.FacePipeline``);
  the recognizer is the served model described by the parameter ``recognizer``, called through BLS, so its
  dynamic batcher merges the faces of concurrent requests.

Where facekit comes from: the stub runs the first ``python3`` on the server's PATH (a venv's works: its
``pyvenv.cfg`` is honoured) in isolated mode, which ignores ``PYTHONPATH``; this file adds ``PYTHONPATH``'s
entries to ``sys.path`` itself, before importing facekit. Tensors cross the stub boundary through DLPack only:
the stub's numpy conversion (``Tensor.as_numpy``, ``Tensor(name, array)``) misreads numpy-2 arrays in stubs
built with pybind11 older than 2.12 (the one bundled with Triton 2.51 among them).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys


def add_pythonpath() -> None:
    """Put ``$PYTHONPATH``'s entries first on ``sys.path`` (the stub's isolated interpreter ignores it)."""
    present = {os.path.abspath(p) for p in sys.path if p}
    for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
        if os.path.abspath(entry) not in present:
            sys.path.insert(0, entry)


add_pythonpath()

import numpy as np  # noqa: E402

try:
    from runtime.backends.base import Backend, load_model
    from runtime.detector import DEFAULT_SCORE_THRESHOLD
    from runtime.metadata import METADATA_KEY
    from runtime.pipeline import FacePipeline
except ImportError as error:
    raise ImportError(f"facekit's runtime is not importable in Triton's Python backend ({error}); install "
                      "facekit into the python3 first on the server's PATH, or set PYTHONPATH to it "
                      f"(sys.path: {sys.path})") from None

#: ``triton_python_backend_utils``, bound in :meth:`TritonPythonModel.initialize` (it exists only in the stub)
pb_utils = None

# Once the stub has consumed a capsule it renames it "used_dlpack"; numpy's capsule destructor expects the
# DLPack spelling "used_dltensor" and otherwise prints a spurious traceback (the stub frees the tensor itself).
_USED_CAPSULE_NAME = ctypes.create_string_buffer(b"used_dltensor")  # must outlive every capsule renamed to it
_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_set_capsule_name = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p)(
    ("PyCapsule_SetName", ctypes.pythonapi))


def to_numpy(tensor) -> np.ndarray:
    """A Triton tensor (CPU memory) as a numpy array of its own (copied out through DLPack)."""
    return np.array(np.from_dlpack(tensor), copy=True)


def to_tensor(name: str, array: np.ndarray):
    """A Triton tensor named ``name`` holding ``array`` (made C-contiguous), built through DLPack."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    if _capsule_name(capsule) == b"used_dlpack":
        _set_capsule_name(capsule, ctypes.addressof(_USED_CAPSULE_NAME))
    return tensor


def error_response(error: Exception):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))


class OnnxModel:
    """An ONNX file of the version folder, run by the runtime's ONNX Runtime backend."""

    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
        self.model = load_model(path, backend="onnxruntime")
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: list) -> list:
        try:
            arrays = [to_numpy(pb_utils.get_input_tensor_by_name(r, self.input)) for r in requests]
            if not self.batched:
                results = [self.model.run(x) for x in arrays]
            else:  # the dynamic batcher's requests share their non-batch dims: one model call
                outs = self.model.run(np.concatenate(arrays))
                bounds = np.cumsum([0] + [len(x) for x in arrays])
                results = [[o[a:b] for o in outs] for a, b in zip(bounds[:-1], bounds[1:])]
        except Exception as e:
            return [error_response(e) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[to_tensor(n, o) for n, o in zip(self.outputs, outs)])
                for outs in results]


def _shape(dims: list) -> list:
    """Config dims (-1: dynamic) as the Backend interface spells them (None: dynamic)."""
    return [None if int(d) < 0 else int(d) for d in dims]


class BLSRecognizer(Backend):
    """A recognizer served by the same Triton server, called through BLS (business-logic scripting)."""

    name = "triton-bls"

    def __init__(self, spec: dict, raw_metadata: dict[str, str]):
        super().__init__(f"bls:{spec['model']}")
        self.spec = spec
        self._keep_metadata(raw_metadata)
        self.dtype = pb_utils.triton_string_to_numpy(spec["data_type"])
        self._device = f"Triton model {spec['model']} (BLS)"
        self._set_io(spec["input"], _shape(spec["dims"]), spec["outputs"], [_shape(d) for d in spec["output_dims"]])

    @property
    def max_batch(self) -> int | None:
        return int(self.spec["max_batch_size"]) or super().max_batch

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        step = self.max_batch or len(x)
        parts = [self._infer(x[i:i + step]) for i in range(0, len(x), step)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names))]

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        memory = {}
        if hasattr(pb_utils, "PreferredMemory"):  # outputs in CPU memory even from a GPU model
            memory["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=self.spec["model"], requested_output_names=self.output_names,
                                            inputs=[to_tensor(self.input_name, x.astype(self.dtype))], **memory)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.spec['model']}: {response.error().message()}")
        return [to_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in self.output_names]


class FacePipelineModel:
    """Image bytes → every face's box, score, landmarks and embedding, by ``runtime.FacePipeline``."""

    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        folder = os.path.join(args["model_repository"], args["model_version"])
        detector = os.path.join(folder, params["detector"]) if params.get("detector") else None
        meta = {METADATA_KEY: params[METADATA_KEY]} if METADATA_KEY in params else {}
        recognizer = BLSRecognizer(json.loads(params["recognizer"]), meta)
        self.embedding_size = int(next(o for o in config["output"] if o["name"] == "embeddings")["dims"][-1])
        self.pipeline = FacePipeline(recognizer=recognizer, detector=detector,
                                     score_threshold=float(params.get("score_threshold", DEFAULT_SCORE_THRESHOLD)),
                                     max_side=int(params["max_side"]), min_side=int(params["min_side"]),
                                     flip_test=params.get("flip_test", "true") == "true")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                data = to_numpy(pb_utils.get_input_tensor_by_name(request, "image")).tobytes()
                faces = self.pipeline.embed(data)
                n = len(faces)
                outputs = {
                    "boxes": np.asarray([f.box for f in faces], np.float32).reshape(n, 4),
                    "scores": np.asarray([f.score for f in faces], np.float32).reshape(n),
                    "landmarks": np.asarray([f.landmarks for f in faces], np.float32).reshape(n, 5, 2),
                    "embeddings": np.asarray([f.embedding for f in faces], np.float32).reshape(n, self.embedding_size),
                }
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[to_tensor(k, v) for k, v in outputs.items()]))
            except Exception as e:  # a bad image fails its own request only
                responses.append(error_response(e))
        return responses


MODELS = {"onnx": OnnxModel, "face_pipeline": FacePipelineModel}


class TritonPythonModel:
    """The entry point Triton's Python backend instantiates; delegates to the model ``facekit_model`` names."""

    def initialize(self, args: dict) -> None:
        global pb_utils
        import triton_python_backend_utils

        pb_utils = triton_python_backend_utils
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = params.get("facekit_model")
        if kind not in MODELS:
            raise ValueError(f"{args['model_name']}: config parameter facekit_model must be one of "
                             f"{sorted(MODELS)}, got {kind!r}")
        self.model = MODELS[kind](args, config, params)

    def execute(self, requests: list) -> list:
        return self.model.execute(requests)

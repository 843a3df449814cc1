"""PyTorch → ONNX: where the model comes from, the export itself, and the metadata the runtime reads back.

One file per model (no external data), a dynamic batch axis, a stated opset, ``onnx.checker``, optional
onnxslim simplification, and one ``metadata_props`` entry written by :func:`runtime.metadata.encode_metadata`.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from runtime.files import sha256_file
from runtime.metadata import METADATA_KEY
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec, spec_from_config, to_model_input

from .onnx_utils import opset_of, precision_of, read_metadata, save_onnx, set_metadata, set_metadata_props

#: Default ONNX opset: supported by ONNX Runtime ≥ 1.12 and TensorRT 8.6–11.
DEFAULT_OPSET = 17
#: Name of the single model input in every exported graph.
INPUT_NAME = "input"
#: Name of the recognizer's output (N × embedding_size, not normalised).
EMBEDDING_OUTPUT = "embedding"


@dataclass
class ModelSource:
    """A PyTorch model ready for export, with everything its metadata needs."""

    model: nn.Module
    task: str  # "recognition" or "landmarks"
    spec: PreprocessSpec
    arch: str
    embedding_size: int | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    threshold_cosine: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return self.checkpoint is None


def aligner_source(config: dict[str, Any], model: nn.Module | None = None, checkpoint: str | None = None) -> ModelSource:
    """An aligner (task "landmarks") to export; geometry, input spec and extra metadata come from
    :func:`runtime.landmarks.aligner_metadata` (defined once there). ``model`` None: random init."""
    from runtime.landmarks import aligner_metadata
    from train.hourglass import build_aligner, full_config

    cfg = full_config(config)
    meta = aligner_metadata(cfg)
    spec = PreprocessSpec.from_dict(meta.pop("preprocess"))
    for k in ("task", "arch", "num_landmarks", "landmark_order"):
        meta.pop(k, None)
    if model is None:
        model = build_aligner(cfg)
    return ModelSource(model=model.eval(), task="landmarks", spec=spec, arch=str(cfg.get("arch", "hourglass")),
                       checkpoint=checkpoint, checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None,
                       config=cfg, extra_metadata=meta)


def from_arch(arch: str, embedding_size: int = 512, seed: int = 0, **kw) -> ModelSource:
    """A randomly initialised recognizer backbone (for testing the export path)."""
    from train.backbones import build_backbone

    torch.manual_seed(seed)
    model = build_backbone(arch, embedding_size, **kw).eval()
    return ModelSource(model=model, task="recognition", spec=RECOGNIZER_SPEC,
                       arch=getattr(model, "arch", arch), embedding_size=embedding_size)


def from_checkpoint(path: str | os.PathLike, threshold_cosine: float | None = None) -> ModelSource:
    """The model stored in a training checkpoint (recognizer or aligner)."""
    from train.checkpoint import build_model_from_checkpoint

    model, config = build_model_from_checkpoint(path)
    model.eval()
    task = config.get("task", "recognition")
    if threshold_cosine is None:
        threshold_cosine = config.get("threshold_cosine")
    if task == "landmarks":
        return aligner_source(config, model=model, checkpoint=str(path))
    spec = spec_from_config(config)
    return ModelSource(model=model, task=task, spec=spec, arch=str(config.get("arch")),
                       embedding_size=int(config.get("embedding_size", 512)), checkpoint=str(path),
                       checkpoint_sha256=sha256_file(path),
                       threshold_cosine=None if threshold_cosine is None else float(threshold_cosine),
                       config=config)


def output_names(source: ModelSource, n_outputs: int) -> list[str]:
    """Graph output names: ``embedding`` for recognizers; the model's own ``onnx_output_names`` if it has them."""
    own = getattr(source.model, "onnx_output_names", None)
    if own:
        names = list(own)
    elif source.task == "recognition":
        names = [EMBEDDING_OUTPUT]
    elif n_outputs == 1 and isinstance(source.extra_metadata.get("output"), str):
        names = [source.extra_metadata["output"]]  # the aligner's "heatmaps"
    else:
        names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    if len(names) != n_outputs:
        raise ValueError(f"model returns {n_outputs} outputs but names {names} were given")
    return names


def torch_forward(model: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Run the PyTorch model in fp32 on one batch; every output as a float32 numpy array."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().float().cpu().numpy() for o in outs]


def recalibrate_batchnorm(model: nn.Module, crops: np.ndarray, spec: PreprocessSpec,
                          color_order: str = "BGR", batch: int = 16) -> int:
    """Re-estimate BatchNorm running statistics from ``crops`` (cumulative average), then return to eval mode.

    A randomly initialised network evaluated with the default statistics (mean 0, variance 1) over- or
    underflows (iResNet-50: |y| ~ 1e26; MobileFaceNet: ~1e-7), which makes fp16 / INT8 checks meaningless.
    Only used for ``--arch`` (random) exports. Returns the number of BatchNorm layers touched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    x = to_model_input(crops, spec, color_order=color_order)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            if len(chunk) < 2:
                break
            model(torch.from_numpy(chunk))
    model.eval()
    return len(bns)


def export_fp32(source: ModelSource, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``source.model`` to an fp32 ONNX graph with a dynamic batch axis (TorchScript exporter)."""
    model = source.model.eval()
    h, w = source.spec.input_size
    dummy = torch.zeros(2, 3, h, w) if source.spec.layout == "NCHW" else torch.zeros(2, h, w, 3)
    with torch.inference_mode():
        probe = model(dummy)
    n_out = len(probe) if isinstance(probe, (list, tuple)) else 1
    names = output_names(source, n_out)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]},
        )
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return proto


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Simplify with onnxslim (constant folding, dead-node removal); keeps the metadata."""
    import onnxslim

    props = {p.key: p.value for p in proto.metadata_props}
    out = onnxslim.slim(proto)
    if out is None:
        raise RuntimeError("onnxslim returned no model")
    set_metadata_props(out, props)
    onnx.checker.check_model(out)
    return out


def build_metadata(source: ModelSource, precision: str, opset: int, **extra: Any) -> dict[str, Any]:
    """The facekit metadata dict for an exported model (see :mod:`runtime.metadata`)."""
    meta: dict[str, Any] = {
        "task": source.task,
        "preprocess": source.spec.to_dict(),
        "arch": source.arch,
        "precision": precision,
        "opset": int(opset),
        "input_name": INPUT_NAME,
        "checkpoint_sha256": source.checkpoint_sha256,
        "weights": "checkpoint" if source.checkpoint else "random-init",
        "exporter": "facekit export/to_onnx.py",
    }
    if source.embedding_size is not None:
        meta["embedding_size"] = int(source.embedding_size)
    if source.threshold_cosine is not None:
        meta["threshold_cosine"] = float(source.threshold_cosine)
    if source.task == "landmarks":
        meta["num_landmarks"] = len(source.spec.landmark_order)
        meta["landmark_order"] = list(source.spec.landmark_order)
    meta.update(source.extra_metadata)
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


__all__ = [
    "DEFAULT_OPSET", "INPUT_NAME", "EMBEDDING_OUTPUT", "METADATA_KEY", "ModelSource",
    "from_arch", "from_checkpoint", "aligner_source", "recalibrate_batchnorm", "export_fp32", "simplify",
    "build_metadata", "set_metadata", "read_metadata", "precision_of", "save_onnx",
    "torch_forward", "opset_of",
]

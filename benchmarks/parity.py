"""Embedders for every backend, and how closely they agree on the same aligned crops.

An *embedder* maps uint8 BGR crops (N×H×W×3, its ``spec``'s size) to raw (unnormalised) embeddings:

- :class:`BackendEmbedder`: an exported model through ``runtime.backends.load_model`` (ONNX Runtime CPU /
  CUDA for fp32, fp16 and INT8 Q/DQ ONNX files; TensorRT engines when ``tensorrt`` is installed), fed by
  ``runtime.preprocess.to_model_input`` with the preprocessing stored in the model's metadata.
- :class:`TorchEmbedder`: a training checkpoint via ``train.checkpoint.build_model_from_checkpoint``
  (fp32, or fp16 autocast on a GPU). torch is imported only here, only when used.

:func:`compare_backends` embeds the same crops with each, and reports the minimum and mean cosine of each
backend's per-crop embeddings (crops and their flips) against the reference (PyTorch fp32 when a checkpoint
is given, else the fp32 ONNX model on the CPU) and the verification accuracy of each.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.verification import evaluate, flip_sum_embeddings
from runtime.backends.tensorrt import ENGINE_EXTENSIONS
from runtime.cpu import usable_cores
from runtime.preprocess import l2_normalize
from train.model_files import is_checkpoint

from .cpu_plans import concurrent_requests, openvino_options, openvino_variants

#: engine files: what the TensorRT backend loads
ENGINE_SUFFIXES = ENGINE_EXTENSIONS


class BackendEmbedder:
    """A recognizer file run by a runtime backend (``backend`` "onnxruntime", "tensorrt" or "auto")."""

    def __init__(self, path: str | os.PathLike, backend: str = "auto", device: str | None = None,
                 batch_size: int = 64, threads: int | None = None, name: str | None = None, **options):
        from runtime.backends import load_model
        from runtime.metadata import preprocess_spec
        from runtime.preprocess import RECOGNIZER_SPEC

        self.path = str(path)
        if device:
            options["device"] = device
        if threads:
            options["threads"] = threads  # ONNX Runtime intra-op threads (other backends ignore it)
        self.model = load_model(self.path, backend=backend, **options)
        meta = dict(self.model.metadata or {})
        if meta.get("task", "recognition") != "recognition":
            raise ValueError(f"{self.path}: a {meta['task']} model, not a recognizer")
        if "preprocess" in meta:
            self.spec = preprocess_spec(meta)
        else:
            print(f"warning: {self.path} has no facekit metadata; assuming the ArcFace preprocessing "
                  "(112×112 RGB, (x−127.5)/127.5)", file=sys.stderr)
            self.spec = RECOGNIZER_SPEC
        self.metadata = meta
        self.precision = str(meta.get("precision") or _precision_from_name(self.path))
        self.backend = self.model.name
        self.device = self.model.device
        self.max_batch = self.model.max_batch
        self.fixed_batch = self.model.fixed_batch
        self.batch_size = min(batch_size, self.max_batch) if self.max_batch else batch_size
        self._name = name

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        dev = "cuda" if "CUDA" in self.device.upper() or "GPU" in self.device.upper() else "cpu"
        if self.backend == "tensorrt":
            dev = "gpu"
        return f"{self.backend}-{dev} {self.precision}"

    def __call__(self, crops_bgr: np.ndarray) -> np.ndarray:
        return self.model.run_batched(crops_bgr, self.max_batch or len(crops_bgr), lambda c: to_input(c, self.spec))


def to_input(crops_bgr: np.ndarray, spec) -> np.ndarray:
    from runtime.preprocess import to_model_input

    return to_model_input(crops_bgr, spec, color_order="BGR")


_TORCH_DEFAULT_THREADS: dict[str, int] = {}


class TorchEmbedder:
    """A training checkpoint run in PyTorch eager mode (fp32, or fp16 autocast on CUDA)."""

    backend = "pytorch"

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu", fp16: bool = False, batch_size: int = 64,
                 threads: int | None = None):
        import torch

        from runtime.preprocess import spec_from_config
        from train.checkpoint import build_model_from_checkpoint

        if fp16 and not str(device).startswith("cuda"):
            raise ValueError("fp16 autocast is measured on CUDA only")
        self.torch = torch
        self.path = str(checkpoint)
        model, config = build_model_from_checkpoint(self.path)
        if config.get("task", "recognition") != "recognition":
            raise ValueError(f"{self.path}: a {config.get('task')} checkpoint, not a recognizer")
        self.model = model.to(device).eval()
        self.config = config
        self.device = str(device)
        self.fp16 = fp16
        self.precision = "fp16-autocast" if fp16 else "fp32"
        self.spec = spec_from_config(config)
        self.batch_size = batch_size
        self.metadata = {"arch": config.get("arch"), "embedding_size": config.get("embedding_size")}
        #: intra-op threads while this embedder runs (None: torch's default for this process)
        self.threads = threads or _TORCH_DEFAULT_THREADS.setdefault("n", torch.get_num_threads())

    @property
    def name(self) -> str:
        return f"pytorch-{'cuda' if self.device.startswith('cuda') else 'cpu'} {self.precision}"

    def __call__(self, crops_bgr: np.ndarray) -> np.ndarray:
        torch = self.torch
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(to_input(crops_bgr, self.spec)).to(self.device)
        with torch.inference_mode():
            if self.fp16:
                with torch.autocast("cuda", dtype=torch.float16):
                    y = self.model(x)
            else:
                y = self.model(x)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        return y.float().cpu().numpy()


def _precision_from_name(path: str) -> str:
    stem = Path(path).stem.lower()
    for p in ("int8", "fp16", "fp32"):
        if p in stem:
            return p
    return "fp32"


def _recognition_metadata(path: Path) -> dict | None:
    """facekit metadata of an ONNX file (None when it is not a facekit recognizer)."""
    from runtime.metadata import ModelMetadataError, decode_metadata, read_onnx_metadata

    try:
        meta = decode_metadata(read_onnx_metadata(path), source=str(path))
    except (ModelMetadataError, OSError):
        return None
    return meta if meta.get("task") == "recognition" else None


@dataclass
class BackendPlan:
    """One backend to measure: what to build and why it is (or is not) measured."""

    label: str
    kind: str  # "onnx", "openvino", "engine" or "torch"
    path: str
    device: str
    fp16: bool = False
    skip_reason: str | None = None
    precision: str = ""  # OpenVINO's inference precision (f32, bf16, int8)
    options: dict = field(default_factory=dict)  # further load options (e.g. OpenVINO's pinning)

    def build(self, batch_size: int = 64, for_dataset: bool = False):
        """The embedder. ``for_dataset``: on the CPU, one thread per call and ``workers`` concurrent batches
        (faster through a data set on small CPUs); otherwise the backend's default threading (for latency)."""
        cpu_split = for_dataset and self.device == "cpu" and usable_cores() > 1
        threads = 1 if cpu_split else None
        if self.kind == "torch":
            emb = TorchEmbedder(self.path, device=self.device, fp16=self.fp16, batch_size=batch_size, threads=threads)
        elif self.kind == "engine":
            emb = BackendEmbedder(self.path, backend="tensorrt", batch_size=batch_size)
        elif self.kind == "openvino":
            emb = BackendEmbedder(self.path, backend="openvino", batch_size=batch_size, name=self.label,
                                  **openvino_options(self.precision, for_dataset), **self.options)
            emb.workers = concurrent_requests(emb.model)
            return emb
        else:
            emb = BackendEmbedder(self.path, backend="onnxruntime", device=self.device, batch_size=batch_size,
                                  threads=threads)
        emb.workers = min(4, usable_cores()) if cpu_split else 1
        return emb


def find_checkpoint(model: Path, explicit: str | None = None) -> Path | None:
    """The PyTorch checkpoint for ``model``: ``explicit``, else a ``<stem>*.pt`` beside it whose sha256 is the
    one recorded in the model's metadata (or the only one there when the metadata records none)."""
    if explicit:
        return Path(explicit)
    meta = _recognition_metadata(model) or {}
    want = meta.get("checkpoint_sha256")
    cands = sorted(p for p in model.parent.iterdir() if is_checkpoint(p) and p.stem.startswith(model.stem))
    if want:
        from runtime.files import sha256_file

        for c in cands:
            if sha256_file(c) == want:
                return c
        return None
    return cands[0] if len(cands) == 1 else None


def plan_backends(model: str | os.PathLike, checkpoint: str | None = None, siblings: bool = True) -> list[BackendPlan]:
    """Every backend this machine can run for ``model``: its fp32/fp16/INT8 ONNX siblings (``<stem>*.onnx``
    in the same folder) on ONNX Runtime CPU and CUDA and on OpenVINO (f32, bf16, int8), TensorRT engines
    (``<stem>*.engine|.plan``) when tensorrt is installed, and PyTorch fp32 (+ fp16 autocast on CUDA) from the
    checkpoint when torch is installed. Unavailable ones are listed with the reason."""
    model = Path(model)
    onnx_files, engines = _sibling_files(model) if siblings else ([model], [])
    return _torch_plans(model, checkpoint) + _onnx_plans(onnx_files) + _engine_plans(model, engines)


def _sibling_files(model: Path) -> tuple[list[Path], list[Path]]:
    """``model`` and its recognition ONNX siblings; the TensorRT engines beside it."""
    onnx_files, engines = [model], []
    for p in sorted(model.parent.glob(f"{model.stem}*")):
        if p == model or not p.is_file():
            continue
        if p.suffix == ".onnx" and _recognition_metadata(p) is not None:
            onnx_files.append(p)
        elif p.suffix.lower() in ENGINE_SUFFIXES:
            engines.append(p)
    return onnx_files, engines


def _onnx_plans(onnx_files: list[Path]) -> list[BackendPlan]:
    """ONNX Runtime CPU, then CUDA, then OpenVINO rows, each in fp32, fp16, int8 order."""
    try:
        from runtime.backends.onnxruntime import cuda_usable

        cuda = cuda_usable()
    except ImportError:
        cuda = False
    order = {"fp32": 0, "fp16": 1, "int8": 2}
    described = []
    for p in onnx_files:
        prec = str((_recognition_metadata(p) or {}).get("precision") or _precision_from_name(str(p)))
        described.append((order.get(prec, 3), p, prec))
    described.sort(key=lambda t: (t[0], str(t[1])))
    plans = [BackendPlan(f"onnxruntime-cpu {prec}", "onnx", str(p), "cpu") for _, p, prec in described]
    plans += [BackendPlan(f"onnxruntime-cuda {prec}", "onnx", str(p), "cuda",
                          skip_reason=None if cuda else "onnxruntime-gpu / CUDA not available")
              for _, p, prec in described]
    plans += [BackendPlan(v.label, "openvino", v.path, "cpu", skip_reason=v.skip_reason, precision=v.precision)
              for v in openvino_variants([(str(p), prec) for _, p, prec in described])]
    return plans


def _engine_plans(model: Path, engines: list[Path]) -> list[BackendPlan]:
    from runtime.backends import available_backends

    trt = "tensorrt" in available_backends()
    if not engines:
        return [BackendPlan("tensorrt", "engine", "", "gpu", skip_reason="tensorrt not installed" if not trt else
                            f"no engine beside {model.name} (build one with export/to_trt.py)")]
    return [BackendPlan(f"tensorrt {_precision_from_name(str(e))} ({e.name})", "engine", str(e), "gpu",
                        skip_reason=None if trt else "tensorrt not installed") for e in engines]


def _torch_plans(model: Path, checkpoint: str | None) -> list[BackendPlan]:
    """PyTorch fp32 on the CPU and (fp32 and fp16 autocast) on CUDA, from the model's checkpoint."""
    import importlib.util

    try:
        has_torch = importlib.util.find_spec("torch") is not None
    except ValueError:
        has_torch = False
    ckpt = find_checkpoint(model, checkpoint) if has_torch else None
    torch_cuda = False
    if has_torch and ckpt is not None:
        import torch

        torch_cuda = torch.cuda.is_available()
    no_torch = "torch not installed" if not has_torch else (
        None if ckpt is not None else "no PyTorch checkpoint for this model (pass --checkpoint)")
    plans = [BackendPlan("pytorch-cpu fp32", "torch", str(ckpt or ""), "cpu", skip_reason=no_torch)]
    if torch_cuda:
        return plans + [BackendPlan("pytorch-cuda fp32", "torch", str(ckpt), "cuda"),
                        BackendPlan("pytorch-cuda fp16-autocast", "torch", str(ckpt), "cuda", fp16=True)]
    return plans + [BackendPlan("pytorch-cuda fp16-autocast", "torch", str(ckpt or ""), "cuda",
                                skip_reason=no_torch or "no CUDA GPU")]


@dataclass
class ParityRow:
    """One backend's agreement with the reference on the same crops."""

    backend: str
    reference: str
    min_cosine: float | None
    mean_cosine: float | None
    accuracy: float | None
    accuracy_std: float | None
    crops: int
    seconds: float
    device: str = ""
    file: str = ""
    skip_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("backend", "reference", "min_cosine", "mean_cosine", "accuracy",
                                          "accuracy_std", "crops", "seconds", "device", "file", "skip_reason")}
        for k in ("min_cosine", "mean_cosine", "accuracy", "accuracy_std"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 6)
        d["seconds"] = round(self.seconds, 2)
        d.update(self.extra)
        return d


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def compare_backends(embedders: list, crops: np.ndarray, pairs: np.ndarray | None = None,
                     issame: np.ndarray | None = None, progress: bool = True) -> tuple[list[ParityRow], dict]:
    """Embed ``crops`` with each embedder (the first is the reference) and compare.

    Returns the rows and each backend's flip-summed normalised embeddings (by backend name).
    """
    rows: list[ParityRow] = []
    fused_by_name: dict[str, np.ndarray] = {}
    ref_raw = None
    ref_name = embedders[0].name if embedders else ""
    for emb in embedders:
        t0 = time.perf_counter()
        fused, raw, raw_flip = flip_sum_embeddings(emb, crops, batch_size=getattr(emb, "batch_size", 64),
                                                   progress=f"parity {emb.name}" if progress else None,
                                                   return_parts=True, workers=getattr(emb, "workers", 1))
        seconds = time.perf_counter() - t0
        both = np.concatenate([raw, raw_flip])
        if ref_raw is None:
            ref_raw = both
        cos = row_cosines(both, ref_raw)
        acc = std = None
        if pairs is not None and issame is not None:
            res = evaluate(fused[pairs[:, 0]], fused[pairs[:, 1]], issame)
            acc, std = res.accuracy, res.accuracy_std
        rows.append(ParityRow(emb.name, ref_name, float(cos.min()), float(cos.mean()), acc, std, len(both), seconds,
                              device=str(getattr(emb, "device", "")), file=os.path.basename(getattr(emb, "path", ""))))
        fused_by_name[emb.name] = fused
    return rows, fused_by_name

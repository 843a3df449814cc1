"""INT8 Q/DQ quantization (ONNX Runtime static quantization) and the accuracy guard that can refuse it.

- :func:`quantize_int8`: ``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel symmetric
  int8 weights and symmetric int8 activations (what TensorRT's explicit quantization expects), calibrated on
  aligned face crops; optionally the first and last weighted layers stay float (``nodes_to_exclude``).
- :func:`accuracy_guard`: verification accuracy of the INT8 model against the fp32 one on held-out pairs
  (insightface's protocol from :mod:`evaluation.verification`), plus the minimum cosine between their
  embeddings; the export refuses beyond a set drop.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from runtime.files import atomic_write_bytes
from runtime.metadata import decode_metadata
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec, to_model_input

from .calibration import make_calibration_reader
from .onnx_utils import set_metadata

#: Node types whose weights get quantized and that count as "layers" for keep-first/last.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def weighted_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv / Gemm / MatMul nodes with an initializer weight, in graph (topological) order."""
    inits = {t.name for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits]


def first_last_layers(proto: onnx.ModelProto) -> tuple[str, str]:
    """Names of the first and the last weighted node (the input stem and the embedding / heatmap layer)."""
    nodes = weighted_nodes(proto)
    if not nodes:
        raise ValueError("graph has no Conv/Gemm/MatMul layer with constant weights")
    unnamed = [n for n in (nodes[0], nodes[-1]) if not n.name]
    if unnamed:
        raise ValueError("the first/last layers have no node names; re-export with export/to_onnx.py")
    return nodes[0].name, nodes[-1].name


def downstream_nodes(proto: onnx.ModelProto, name: str) -> list[str]:
    """Names of every node that (transitively) consumes the outputs of node ``name``, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    start = next((n for n in proto.graph.node if n.name == name), None)
    if start is None:
        raise KeyError(f"no node named {name!r}")
    seen: set[str] = set()
    frontier = list(start.output)
    while frontier:
        for n in consumers.get(frontier.pop(), []):
            if n.name and n.name not in seen:
                seen.add(n.name)
                frontier.extend(n.output)
    return [n.name for n in proto.graph.node if n.name in seen]


def float_ends(proto: onnx.ModelProto) -> list[str]:
    """Nodes kept float by ``keep_float_ends``: the first weighted layer, the last one and everything after it
    (e.g. the BN1d "features" layer behind the embedding FC)."""
    first, last = first_last_layers(proto)
    return [first, last] + [n for n in downstream_nodes(proto, last) if n not in (first, last)]


def preprocess_for_quantization(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """ONNX Runtime's recommended pre-quantization pass (shape inference + graph optimisation, e.g. MatMul+BN
    fused into one Gemm); falls back to ONNX shape inference only, then to the graph as is. Returns the
    path to quantize."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    for symbolic_skip in (False, True):
        try:
            # when symbolic shape inference gives up it dumps sym_shape_infer_temp.onnx + <uuid>.data into
            # the working directory: let that happen next to dst (a temporary folder), not in the user's
            with contextlib.chdir(dst.parent):  # process-wide: for export tools, not for servers
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=symbolic_skip)
            return str(dst)
        except Exception:  # symbolic shape inference gives up on some graphs (e.g. Resize in the hourglass)
            continue
    return str(src)


def qdq_counts(proto: onnx.ModelProto) -> tuple[int, int]:
    """(QuantizeLinear, DequantizeLinear) node counts."""
    ops = [n.op_type for n in proto.graph.node]
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


def node_is_quantized(proto: onnx.ModelProto, name: str) -> bool:
    """Whether node ``name`` reads its weight through a DequantizeLinear (i.e. runs in int8)."""
    dq_outputs = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for n in proto.graph.node:
        if n.name == name:
            return len(n.input) > 1 and n.input[1] in dq_outputs
    raise KeyError(f"no node named {name!r}")


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, crops: np.ndarray,
                  spec: PreprocessSpec, *, keep_float_ends: bool = False, exclude: Sequence[str] = (),
                  per_channel: bool = True, method: str = "minmax", batch_size: int = 8,
                  color_order: str = "BGR", metadata: dict[str, Any] | None = None,
                  preprocess: bool = True) -> dict[str, Any]:
    """Quantize an fp32 ONNX file to INT8 Q/DQ, calibrated on aligned ``crops`` (N×H×W×3 uint8).

    ``preprocess``: run :func:`preprocess_for_quantization` first (node names may change, e.g. a fused Gemm);
    ``keep_float_ends`` / ``exclude`` name nodes of the graph actually quantized (see ``info["kept_float"]``).

    Writes ``out_path`` (atomically) with facekit metadata ``precision="int8"`` plus the calibration details,
    and returns those details.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    source_proto = onnx.load(str(fp32_path))
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="facekit-int8-", dir=out_path.parent if out_path.parent.is_dir() else None) as tmp:
        to_quantize = preprocess_for_quantization(fp32_path, Path(tmp) / "pre.onnx") if preprocess else str(fp32_path)
        proto = onnx.load(to_quantize)
        excluded = list(exclude)
        if keep_float_ends:
            excluded += [n for n in float_ends(proto) if n not in excluded]
        known = {n.name for n in proto.graph.node}
        unknown = [n for n in excluded if n not in known]
        if unknown:
            raise ValueError(f"nodes to keep in float not found in the graph: {unknown}")
        reader = make_calibration_reader(crops, spec, proto.graph.input[0].name, batch_size=batch_size,
                                         color_order=color_order)
        tmp_out = Path(tmp) / "int8.onnx"
        quantize_static(
            model_input=to_quantize, model_output=str(tmp_out), calibration_data_reader=reader,
            quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=excluded or None, calibrate_method=calib,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        q = onnx.load(str(tmp_out))
    n_q, n_dq = qdq_counts(q)
    info = {"calibration_images": int(len(crops)), "calibration_method": method, "per_channel": bool(per_channel),
            "symmetric": True, "preprocessed": to_quantize != str(fp32_path), "kept_float": excluded,
            "quantize_nodes": n_q, "dequantize_nodes": n_dq}
    meta = dict(metadata) if metadata is not None else decode_metadata(
        {p.key: p.value for p in source_proto.metadata_props}, source=str(fp32_path))
    meta.update(precision="int8", int8=info)
    set_metadata(q, meta)
    onnx.checker.check_model(q)
    atomic_write_bytes(out_path, q.SerializeToString())
    return info


# ---------------------------------------------------------------------------------------- accuracy guard


@dataclass
class PairCrops:
    """Aligned crops of a verification set: ``crops`` (N×H×W×3 uint8 BGR), ``pairs`` (P×2 indices), ``issame``."""

    crops: np.ndarray
    pairs: np.ndarray
    issame: np.ndarray
    name: str = "pairs"
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.crops = np.asarray(self.crops)
        self.pairs = np.asarray(self.pairs, np.int64).reshape(-1, 2)
        self.issame = np.asarray(self.issame, bool).reshape(-1)
        if self.crops.ndim != 4 or self.crops.shape[-1] != 3 or self.crops.dtype != np.uint8:
            raise ValueError(f"{self.name}: crops must be N×H×W×3 uint8, got {self.crops.dtype} {self.crops.shape}")
        if len(self.pairs) != len(self.issame) or not len(self.pairs):
            raise ValueError(f"{self.name}: {len(self.pairs)} pairs but {len(self.issame)} is-same labels")
        if self.pairs.min() < 0 or self.pairs.max() >= len(self.crops):
            raise ValueError(f"{self.name}: pair indices outside 0..{len(self.crops) - 1}")

    def subset(self, n: int | None) -> "PairCrops":
        """At most ``n`` pairs, spread evenly over the protocol order (keeps folds' balance roughly)."""
        if n is None or n >= len(self.pairs):
            return self
        idx = np.linspace(0, len(self.pairs) - 1, int(n)).round().astype(int)
        pairs = self.pairs[idx]
        used, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
        return PairCrops(self.crops[used], inverse.reshape(-1, 2), self.issame[idx], self.name,
                         {**self.notes, "subset_of": len(self.pairs)})


def save_pair_crops(path: str | os.PathLike, pc: PairCrops) -> None:
    """Write a :class:`PairCrops` npz (``crops``, ``pairs``, ``issame``) — the ``--pairs FILE.npz`` format."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, crops=pc.crops, pairs=pc.pairs, issame=pc.issame)
    atomic_write_bytes(path, buf.getvalue())


def load_pair_crops(path: str | os.PathLike, kind: str = "auto", spec: PreprocessSpec = RECOGNIZER_SPEC,
                    progress: bool = True) -> PairCrops:
    """Held-out pairs for the guard from an npz (``crops``/``pairs``/``issame``, BGR), an insightface ``.bin``,
    an LFW folder (``pairs.txt`` + images) or a CFP folder (``cfp-fp`` / ``cfp-ff``). Raw photos are
    detected and warped onto ``spec``'s template through :mod:`evaluation.crops` (cached)."""
    size = tuple(spec.input_size)
    path = Path(path)
    if kind == "auto":
        if path.suffix.lower() == ".npz":
            kind = "npz"
        elif path.suffix.lower() == ".bin":
            kind = "bin"
        elif (path / "pairs.txt").is_file():
            kind = "lfw"
        elif (path / "Protocol").is_dir():
            kind = "cfp-fp"
        else:
            raise ValueError(f"{path}: cannot tell the pair-set kind (npz, .bin, LFW folder with pairs.txt, CFP folder)")
    if kind == "npz":
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("crops", "pairs", "issame") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: npz lacks {', '.join(missing)} (expected crops, pairs, issame)")
            pc = PairCrops(z["crops"], z["pairs"], z["issame"], path.stem)
    else:
        from evaluation.crops import aligned_crops
        from evaluation.pairs import load_pairset

        pairset = load_pairset(kind, path)
        cropset = aligned_crops(pairset, progress=progress, spec=spec)
        pc = PairCrops(cropset.crops, pairset.pairs, pairset.issame, pairset.name, {"crops": cropset.counts()})
    if tuple(pc.crops.shape[1:3]) != tuple(size):
        raise ValueError(f"{path}: crops are {pc.crops.shape[2]}×{pc.crops.shape[1]}, the model expects {size[1]}×{size[0]}")
    return pc


@dataclass
class GuardReport:
    """INT8 vs fp32 on held-out pairs: accuracies (fractions), drop in points, embedding cosines."""

    accuracy_fp32: float | None
    accuracy_int8: float | None
    drop_points: float | None
    min_cos: float
    mean_cos: float
    pairs: int
    max_drop_points: float
    min_cos_required: float
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        r = lambda v, d: None if v is None else round(float(v), d)  # noqa: E731
        return {"accuracy_fp32": r(self.accuracy_fp32, 6), "accuracy_int8": r(self.accuracy_int8, 6),
                "drop_points": r(self.drop_points, 4), "min_cos": r(self.min_cos, 6), "mean_cos": r(self.mean_cos, 6),
                "pairs": self.pairs, "max_drop_points": self.max_drop_points, "min_cos_required": self.min_cos_required}

    def lines(self) -> list[str]:
        out = []
        if self.accuracy_fp32 is not None:
            out.append(f"int8 guard: accuracy fp32 {100 * self.accuracy_fp32:.2f} %  int8 {100 * self.accuracy_int8:.2f} %  "
                       f"drop {self.drop_points:+.2f} points (limit {self.max_drop_points}) on {self.pairs} pairs")
        out.append(f"int8 guard: embedding cosine int8 vs fp32 min {self.min_cos:.5f} mean {self.mean_cos:.5f} "
                   f"(required ≥ {self.min_cos_required})")
        return out


def _embedder(backend, spec: PreprocessSpec):
    def embed(batch: np.ndarray) -> np.ndarray:
        return backend.run(to_model_input(batch, spec, color_order="BGR"))[0]
    return embed


def accuracy_guard(fp32_backend, int8_backend, spec: PreprocessSpec, pairs: PairCrops | None = None,
                   crops: np.ndarray | None = None, max_drop_points: float = 0.3, min_cos: float = 0.98,
                   batch_size: int = 64, progress: bool = False) -> GuardReport:
    """Compare the INT8 model with the fp32 one (both runtime backends).

    With ``pairs``: insightface-protocol verification accuracy of each (flip-summed embeddings, k-fold
    threshold), and the cosine of their raw embeddings on every crop. Without: cosines on ``crops`` only.
    """
    from evaluation.verification import evaluate, flip_sum_embeddings

    reasons: list[str] = []
    acc32 = acc8 = drop = None
    if pairs is not None:
        fused32, raw32, _ = flip_sum_embeddings(_embedder(fp32_backend, spec), pairs.crops, batch_size,
                                                progress="fp32 embeddings" if progress else None, return_parts=True)
        fused8, raw8, _ = flip_sum_embeddings(_embedder(int8_backend, spec), pairs.crops, batch_size,
                                              progress="int8 embeddings" if progress else None, return_parts=True)
        folds = min(10, len(pairs.pairs))
        a, b = pairs.pairs[:, 0], pairs.pairs[:, 1]
        acc32 = evaluate(fused32[a], fused32[b], pairs.issame, n_folds=folds).accuracy
        acc8 = evaluate(fused8[a], fused8[b], pairs.issame, n_folds=folds).accuracy
        drop = 100.0 * (acc32 - acc8)
        if not drop <= max_drop_points:
            reasons.append(f"INT8 verification accuracy drops {drop:.2f} points (> {max_drop_points} allowed): "
                           f"fp32 {100 * acc32:.2f} %, int8 {100 * acc8:.2f} % on {len(pairs.pairs)} pairs")
    else:
        if crops is None:
            raise ValueError("give held-out pairs or at least crops to compare on")
        embed32, embed8 = _embedder(fp32_backend, spec), _embedder(int8_backend, spec)
        raw32 = np.concatenate([embed32(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
        raw8 = np.concatenate([embed8(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)])
    from .parity import compare_outputs

    _, cmin, cmean = compare_outputs(raw32, raw8)
    if not cmin >= min_cos:
        reasons.append(f"INT8 embeddings reach only cosine {cmin:.4f} with fp32 (≥ {min_cos} required)")
    return GuardReport(acc32, acc8, drop, cmin, cmean, 0 if pairs is None else len(pairs.pairs),
                       max_drop_points, min_cos, reasons)

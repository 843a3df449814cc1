"""fp16 ONNX graphs whose inputs and outputs stay fp32 (callers keep feeding float32).

Uses the float16 converter that ships with ONNX Runtime (``onnxruntime.transformers.float16``, the same
code as onnxconverter-common's), so no extra package is needed. TensorRT builds such a graph in fp16 as a
strongly typed network; ONNX Runtime CPU runs it too (it inserts casts where it lacks fp16 kernels).
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import onnx

from .onnx_utils import set_metadata_props


def to_fp16(proto: onnx.ModelProto, keep_io_types: bool = True,
            op_block_list: Iterable[str] | None = None) -> onnx.ModelProto:
    """An fp16 copy of an fp32 graph; ``keep_io_types`` keeps the graph inputs/outputs fp32 (Cast at the edges).

    Weights outside the fp16 range are clamped by the converter; :func:`fp16_overflow_count` says how many.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src = onnx.ModelProto()
    src.CopyFrom(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    blocked = list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list or [])
    log = logging.getLogger("onnxruntime.transformers.float16")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns for every clamped tiny weight
    try:
        out = convert_float_to_float16(src, keep_io_types=keep_io_types, op_block_list=blocked)
    finally:
        log.setLevel(level)
    topological_sort(out.graph)  # the converter appends its input Casts at the end of the node list
    set_metadata_props(out, props)
    onnx.checker.check_model(out)
    return out


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise ValueError(f"graph has a cycle or undefined inputs: {missing}")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def fp16_overflow_count(proto: onnx.ModelProto) -> int:
    """How many fp32 weights of ``proto`` exceed the largest finite fp16 value (65504)."""
    from onnx import numpy_helper

    n = 0
    for t in proto.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            n += int((np.abs(numpy_helper.to_array(t)) > 65504).sum())
    return n


#: Weights with fewer values than this stay fp32 in :func:`with_fp16_weights` (biases, norms: no size to win).
FP16_WEIGHTS_MIN_ELEMENTS = 64


def with_fp16_weights(proto: onnx.ModelProto, min_elements: int = FP16_WEIGHTS_MIN_ELEMENTS) -> onnx.ModelProto:
    """The same fp32 graph with its larger float weights stored as fp16, each cast back to fp32 by a ``Cast``
    node: half the file size. ONNX Runtime folds those Casts into constants when the session is created, so
    the model computes in fp32 exactly as with the fp16-rounded weights. Weights of fewer than
    ``min_elements`` values (biases, norms) stay fp32. Refuses weights outside the fp16 range."""
    from onnx import helper, numpy_helper

    over = fp16_overflow_count(proto)
    if over:
        raise ValueError(f"{over} weights exceed the fp16 range; they cannot be stored as fp16")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    kept, casts = [], []
    for t in graph.initializer:
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < min_elements:
            kept.append(t)
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), f"{t.name}__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [t.name], to=onnx.TensorProto.FLOAT,
                                      name=f"{t.name}__to_fp32"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out

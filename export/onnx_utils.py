"""Small torch-free ONNX helpers: metadata in and out, precision detection, hashing, atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

from typing import Any

import onnx

from runtime.files import atomic_write_bytes
from runtime.metadata import decode_metadata, encode_metadata


def opset_of(proto: onnx.ModelProto) -> int:
    """The default-domain opset a graph was written for."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_metadata_props(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace entries of ``proto.metadata_props`` with ``props`` (other keys are kept)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for k, v in keep + list(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Write facekit metadata into the graph (validated by decoding it back)."""
    props = encode_metadata(meta)
    decode_metadata(props, source="export")
    set_metadata_props(proto, props)


def read_metadata(proto_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, Any]:
    """Decoded facekit metadata of an ONNX graph or file (via the ``onnx`` package)."""
    proto = proto_or_path if isinstance(proto_or_path, onnx.ModelProto) else onnx.load(
        str(proto_or_path), load_external_data=False)
    return decode_metadata({p.key: p.value for p in proto.metadata_props}, source="onnx")


def precision_of(proto: onnx.ModelProto) -> str:
    """What the graph computes in: "int8" (Q/DQ nodes), "fp16" (fp16 initializers) or "fp32"."""
    ops = {n.op_type for n in proto.graph.node}
    if "QuantizeLinear" in ops or "DequantizeLinear" in ops:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write one self-contained ONNX file atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    data = proto.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise ValueError(f"{path}: graph is {len(data) / 2**30:.1f} GiB; one-file ONNX is limited to 2 GiB")
    return atomic_write_bytes(path, data)

"""The metadata every facekit model carries, and how it is read back.

Exported ONNX models hold one ``metadata_props`` entry, key :data:`METADATA_KEY`, whose value is a JSON
object. The runtime reads it (:func:`read_onnx_metadata`, without the ``onnx`` package or an inference
engine) instead of guessing.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, BinaryIO

from .preprocess import PreprocessSpec

METADATA_KEY = "facekit"
#: Bumped when the meaning of a field changes; the runtime refuses newer versions.
FORMAT_VERSION = 1
TASKS = ("recognition", "landmarks", "detection")


class ModelMetadataError(ValueError):
    """A model file lacks facekit metadata, or carries metadata this runtime cannot use."""


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` entries (key → string) for ``meta``; adds the format version."""
    body = dict(meta)
    body.setdefault("format_version", FORMAT_VERSION)
    if body.get("task") not in TASKS:
        raise ModelMetadataError(f"metadata task must be one of {TASKS}, got {body.get('task')!r}")
    return {METADATA_KEY: json.dumps(body, sort_keys=True)}


def decode_metadata(props: dict[str, str], source: str = "model") -> dict[str, Any]:
    """Parse and validate the facekit entry of a model's ``metadata_props`` map."""
    if METADATA_KEY not in props:
        raise ModelMetadataError(
            f"{source}: no '{METADATA_KEY}' metadata; export it with `python export/to_onnx.py` "
            "or pass the preprocessing explicitly"
        )
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ModelMetadataError(f"{source}: facekit metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelMetadataError(f"{source}: facekit metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelMetadataError(
            f"{source}: metadata format version {version!r} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade facekit"
        )
    if meta.get("task") not in TASKS:
        raise ModelMetadataError(f"{source}: unknown task {meta.get('task')!r}")
    if meta["task"] in ("recognition", "landmarks"):
        try:
            PreprocessSpec.from_dict(meta.get("preprocess", {}))
        except (ValueError, TypeError) as e:
            raise ModelMetadataError(f"{source}: {e}") from None
    return meta


def preprocess_spec(meta: dict[str, Any]) -> PreprocessSpec:
    """The :class:`PreprocessSpec` stored in decoded metadata."""
    return PreprocessSpec.from_dict(meta["preprocess"])


def recognizer_preprocessing(model: Any) -> tuple[dict[str, Any], PreprocessSpec]:
    """The metadata and the checked preprocessing of a loaded recognizer (a backend: ``metadata``,
    ``raw_metadata``, ``path``); ModelMetadataError when it has none, is not a recognizer or cannot be warped."""
    meta = dict(model.metadata or {})
    if not meta:  # backends decode metadata when present; report its absence clearly
        meta = decode_metadata(model.raw_metadata, source=model.path)
    if meta.get("task") != "recognition":
        raise ModelMetadataError(
            f"{model.path}: not a recognizer (metadata task is {meta.get('task')!r}, expected 'recognition')"
        )
    spec = preprocess_spec(meta)
    check_warp(spec, model.path)
    return meta, spec


def check_warp(spec: PreprocessSpec, source: str) -> None:
    """Refuse a preprocessing whose alignment template or landmark order the warp cannot use."""
    try:
        spec.check()
    except ValueError as e:
        raise ModelMetadataError(f"{source}: {e}") from None
    if tuple(spec.landmark_order) != tuple(PreprocessSpec().landmark_order):
        raise ModelMetadataError(f"{source}: metadata landmark order {spec.landmark_order} is not facekit's")


# ------------------------------------------------------------------------ ONNX metadata without onnx

_MODEL_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}
_MODEL_GRAPH = 7


def read_onnx_metadata(source: str | os.PathLike | bytes) -> dict[str, str]:
    """The ``metadata_props`` map (key → string) of an ONNX file or its bytes, read from the protobuf wire
    format directly (no ``onnx`` package, no inference engine; the graph is skipped, not parsed).

    Raises :class:`ModelMetadataError` when ``source`` is not an ONNX model.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    stream: BinaryIO = io.BytesIO(bytes(source)) if name == "<bytes>" else open(source, "rb")
    props: dict[str, str] = {}
    has_graph = False
    with stream:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        try:
            while stream.tell() < size:
                field, wire = divmod(_varint(stream), 8)
                if wire == 2:
                    length = _varint(stream)
                    if stream.tell() + length > size:
                        raise ValueError("truncated field")
                    if field == _MODEL_METADATA_PROPS:
                        key, value = _string_entry(stream.read(length))
                        props[key] = value
                    else:
                        has_graph |= field == _MODEL_GRAPH
                        stream.seek(length, io.SEEK_CUR)
                elif wire == 0:
                    _varint(stream)
                elif wire in (1, 5):
                    stream.seek(8 if wire == 1 else 4, io.SEEK_CUR)
                else:
                    raise ValueError(f"wire type {wire}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelMetadataError(f"{name}: not an ONNX model ({e})") from None
    if not has_graph:
        raise ModelMetadataError(f"{name}: not an ONNX model (no graph)")
    return props


def _varint(stream: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _string_entry(payload: bytes) -> tuple[str, str]:
    """(key, value) of one StringStringEntryProto."""
    fields = {1: "", 2: ""}
    stream = io.BytesIO(payload)
    while stream.tell() < len(payload):
        field, wire = divmod(_varint(stream), 8)
        if wire != 2:
            raise ValueError("malformed metadata entry")
        length = _varint(stream)
        data = stream.read(length)
        if len(data) != length:
            raise ValueError("truncated metadata entry")
        if field in fields:
            fields[field] = data.decode("utf-8")
    return fields[1], fields[2]

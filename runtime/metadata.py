"""The metadata every facekit model carries, and how it is read back.

Exported ONNX models hold one ``metadata_props`` entry, key :data:`METADATA_KEY`, whose value is a JSON
object. The runtime reads it (through ONNX Runtime, without the ``onnx`` package) instead of guessing.
"""
from __future__ import annotations

import json
from typing import Any

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

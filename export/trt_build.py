"""ONNX → serialized TensorRT engine (TensorRT 10.x and 11.x Python API), with sidecar and engine cache.

The network is strongly typed, so precision comes from the ONNX graph itself (fp32, the fp16 graph of
:mod:`export.fp16`, or the Q/DQ graph of :mod:`export.quantize`); no FP16/INT8 builder flags are set (TensorRT
11 removed them; on 10 strong typing ignores them). One optimization profile (min / opt / max batch),
a persistent timing cache, and a JSON sidecar (see :mod:`runtime.backends.tensorrt`) whose build fields
key the cache: an engine whose sidecar disagrees with what is wanted now is rebuilt, or refused.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from runtime.backends.tensorrt import (build_differences, engine_key, import_tensorrt, make_sidecar, read_sidecar,
                                       sidecar_path, sidecar_problems)
from runtime.field_options import option
from runtime.files import atomic_write_bytes, sha256_file

from .onnx_utils import precision_of, read_metadata


class TensorRTMissing(RuntimeError):
    """``tensorrt`` cannot be imported; the message is :data:`runtime.backends.tensorrt.INSTALL_HINT`."""


class StaleEngineError(RuntimeError):
    """An engine exists but was built from/for something else, and rebuilding was not allowed."""


@dataclass(frozen=True)
class BuildOptions:
    """Engine build settings; every field is part of the cache key."""

    min_batch: int = option(1, "smallest batch of the optimization profile")
    #: typical serving batch: TensorRT tunes its kernels for this shape
    opt_batch: int = option(32, "batch TensorRT tunes for")
    max_batch: int = option(256, "largest batch of the optimization profile")
    workspace_mib: int = option(4096, "builder workspace in MiB")
    optimization_level: int = option(3, "builder optimization level 0-5", flag="--opt-level")
    #: fp32 layers may use TF32 (the help describes the switch, ``--no-tf32``)
    tf32: bool = option(True, "fp32 layers in strict fp32 (no TF32)")

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 ≤ min ≤ opt ≤ max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")

    def key_fields(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("min_batch", "opt_batch", "max_batch"):
            d.pop(k)
        return d


def require_tensorrt():
    """Import ``tensorrt`` or raise :class:`TensorRTMissing` (one line: how to install it)."""
    return import_tensorrt(TensorRTMissing)


def onnx_input(proto: onnx.ModelProto) -> tuple[str, list]:
    """Name and shape (dims as int, or the symbolic name) of the graph's single input."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, found {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def profile_shapes(input_shape: list, opts: BuildOptions) -> dict[str, list[int]]:
    """min / opt / max input shapes: the batch axis from ``opts``, the rest from the (static) ONNX dims."""
    rest = input_shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ValueError(f"only the batch axis may be dynamic; input shape is {input_shape}")
    return {k: [b, *rest] for k, b in (("min", opts.min_batch), ("opt", opts.opt_batch), ("max", opts.max_batch))}


def wanted_build(onnx_path: str | os.PathLike, opts: BuildOptions, environment: dict[str, str]) -> dict[str, Any]:
    """The build description (cache-key fields) for ``onnx_path`` on this machine with ``opts``."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    name, shape = onnx_input(proto)
    return {
        "tensorrt_version": environment["tensorrt_version"],
        "gpu_name": environment["gpu_name"],
        "compute_capability": environment["compute_capability"],
        "onnx_sha256": sha256_file(onnx_path),
        "precision": precision_of(proto),
        "input_name": name,
        "profile": profile_shapes(shape, opts),
        "options": opts.key_fields(),
    }


def engine_status(engine_path: str | os.PathLike, build: dict[str, Any]) -> tuple[str, list[str]]:
    """("missing" | "fresh" | "stale", reasons) of an engine file against the wanted ``build``."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        return "missing", [f"{engine_path} does not exist"]
    try:
        side = read_sidecar(engine_path)
    except RuntimeError as e:  # ModelLoadError: no / unreadable sidecar
        return "stale", [str(e)]
    reasons = sidecar_problems(side, engine_bytes=engine_path.read_bytes())
    reasons += build_differences(side.get("build", {}), build)
    if not reasons and side.get("key") != engine_key(build):
        reasons.append("cache key differs")
    return ("fresh" if not reasons else "stale"), reasons


def build_engine(onnx_path: str | os.PathLike, build: dict[str, Any], opts: BuildOptions,
                 timing_cache: str | os.PathLike | None = None, verbose: bool = False) -> bytes:
    """Parse the ONNX into a strongly typed network and build a serialized engine (TensorRT 10/11 API)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11: always strongly typed (the flag is deprecated and ignored)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mib) << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(opts.optimization_level)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not opts.tf32:
        config.clear_flag(tf32)
    profile = builder.create_optimization_profile()
    shapes = build["profile"]
    profile.set_shape(build["input_name"], shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"note: timing cache {cache_path} was made on another device/version; starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build an engine (see the log above)")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def ensure_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, opts: BuildOptions = BuildOptions(),
                  rebuild: str = "auto", timing_cache: str | os.PathLike | None = None, device: int = 0,
                  verbose: bool = False) -> tuple[dict[str, Any], str, list[str]]:
    """Return a usable engine's sidecar, building it when missing or stale.

    ``rebuild``: "auto" (build when missing or stale), "always", or "never" (stale → :class:`StaleEngineError`
    with the reasons). Returns (sidecar, "cached" | "built", reasons it was rebuilt).
    """
    if rebuild not in ("auto", "always", "never"):
        raise ValueError(f"rebuild must be auto, always or never, got {rebuild!r}")
    require_tensorrt()
    from runtime.backends.tensorrt import current_environment

    engine_path = Path(engine_path)
    build = wanted_build(onnx_path, opts, current_environment(device))
    status, reasons = engine_status(engine_path, build)
    if status == "fresh" and rebuild != "always":
        return read_sidecar(engine_path), "cached", []
    if status == "stale" and rebuild == "never":
        raise StaleEngineError(f"{engine_path} is stale or foreign: " + "; ".join(reasons)
                               + " (rebuild it: drop --rebuild never)")
    t0 = time.perf_counter()
    plan = build_engine(onnx_path, build, opts, timing_cache, verbose)
    meta = read_metadata(onnx_path) if _has_facekit_metadata(onnx_path) else {}
    side = make_sidecar(build, plan, meta, source_onnx=os.path.abspath(onnx_path),
                        timing_cache=os.path.abspath(timing_cache) if timing_cache else None,
                        build_seconds=round(time.perf_counter() - t0, 1),
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    # engine first, then its sidecar: a crash in between leaves a sidecar mismatch, detected next time
    atomic_write_bytes(engine_path, plan)
    atomic_write_bytes(sidecar_path(engine_path), (json.dumps(side, indent=2, sort_keys=True) + "\n").encode())
    return side, "built", reasons if status == "stale" else []


def _has_facekit_metadata(onnx_path: str | os.PathLike) -> bool:
    from runtime.metadata import METADATA_KEY

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(p.key == METADATA_KEY for p in proto.metadata_props)

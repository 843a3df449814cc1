"""Which OpenVINO variants the benchmarks run for a recognizer, with which options, on which CPU.

Kept apart from :mod:`benchmarks.parity` (which builds the embedders) so that it can ask this module
without an import circle. Rows: ``openvino-cpu f32`` and ``openvino-cpu bf16`` for an fp32 model,
``openvino-cpu int8`` for an INT8 Q/DQ model; bf16 is listed with the reason where the CPU has no native bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.cpu import cpu_flags, first_isa, has_isa


@dataclass(frozen=True)
class OpenVinoVariant:
    label: str
    path: str
    precision: str
    skip_reason: str | None = None


def openvino_installed() -> bool:
    from runtime.backends import available_backends

    return "openvino" in available_backends()


def openvino_variants(files: list[tuple[str, str]]) -> list[OpenVinoVariant]:
    """OpenVINO rows for ``(path, precision)`` ONNX files (precision as facekit's metadata names it)."""
    if not openvino_installed():
        return [OpenVinoVariant("openvino-cpu", "", "f32", "openvino not installed (pip install openvino)")]
    from runtime.backends.openvino import native_bf16
    from runtime.cpu import cpu_model

    out = []
    for path, precision in files:
        if precision == "fp32":
            out.append(OpenVinoVariant("openvino-cpu f32", path, "f32"))
            out.append(OpenVinoVariant("openvino-cpu bf16", path, "bf16", None if native_bf16() else
                                       f"no native bf16 on {cpu_model()} (needs AMX or AVX512-BF16)"))
        elif precision == "int8":
            out.append(OpenVinoVariant("openvino-cpu int8", path, "int8"))
    return out


def openvino_options(precision: str, for_dataset: bool) -> dict:
    """Load options: latency mode (one stream over all cores) for timing single calls; throughput mode
    (several streams, one concurrent batch per request) to embed a data set."""
    return {"precision": precision, "hint": "throughput" if for_dataset else "latency"}


def concurrent_requests(model) -> int:
    """How many calls an OpenVINO backend runs at once (its optimal number of infer requests)."""
    return max(1, int(model.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))


def widest_isa(flags: frozenset[str] | None = None) -> str | None:
    """The widest of AMX, AVX-512 and AVX2 the CPU (or ``flags``) has; None for none of them or unknown flags."""
    return first_isa(("AMX", "AVX-512", "AVX2"), flags)


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """The CPU's (or ``flags``') vector / matrix instruction sets that decide CPU inference speed, e.g.
    ``"AVX2; no AVX-512, no VNNI, no AMX, no AVX512-BF16"`` (native bf16 is AMX or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return "CPU flags unknown"
    has = [name for name in ("AVX2", "AVX-512", "VNNI", "AMX", "AVX512-BF16") if has_isa(name, flags)]
    missing = [n for n in ("AVX-512", "VNNI", "AMX", "AVX512-BF16") if n not in has]
    return "; ".join(filter(None, [", ".join(has), ", ".join(f"no {n}" for n in missing)]))

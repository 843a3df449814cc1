"""Benchmark reports: the machine they ran on, markdown tables, and the files under ``benchmarks/results``.

A report is a JSON-friendly dict (sections: ``machine``, ``models``, ``verification``, ``parity``,
``latency``, ``pipeline``, ``identification``, ``plots``, ``timings``, ``notes``). :func:`write_report`
writes ``benchmarks/results/<date>-<machine>.md``, the same as ``.json``, and the PNGs in the folder
``benchmarks/results/<date>-<machine>/``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.cpu_plans import isa_summary, widest_isa
from evaluation.data import PROJECT_ROOT
from runtime.cpu import cpu_model, usable_cores
from runtime.files import atomic_write_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gpu_names() -> list[str]:
    """GPU names from ``nvidia-smi`` (empty when there is none)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how busy the machine was (other processes slow every timing)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU model and its instruction sets (AVX-512, VNNI, AMX, …), usable cores, GPU(s), OS, library versions."""
    info = {"cpu": cpu_model(), "isa": isa_summary(), "widest_isa": widest_isa(), "cores": usable_cores(),
            "gpus": gpu_names(), "os": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": load_average()}
    versions = {}
    for mod in ("numpy", "onnxruntime", "openvino", "cv2", "torch", "tensorrt"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:
            pass
    info["versions"] = versions
    return info


def machine_slug(info: dict) -> str:
    """File-name form of the machine: GPU name if any, else the CPU model and its widest vector instruction set
    (CPUs sold under one name differ: "AMD EPYC" is Zen 3 with AVX2 or Zen 4 with AVX-512); plus the core count."""
    base = info["gpus"][0] if info.get("gpus") else info.get("cpu", "cpu")
    base = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*$|\d+-core", "", base, flags=re.I)
    if not info.get("gpus") and info.get("widest_isa"):
        base += " " + info["widest_isa"].replace("-", "")
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "machine"
    return f"{slug}-{info.get('cores', 0)}c"


def machine_line(info: dict) -> str:
    gpu = ", ".join(info.get("gpus") or []) or "no GPU"
    isa = f" ({info['isa']})" if info.get("isa") else ""
    return f"{info['cpu']}{isa}, {info['cores']} cores, {gpu}"


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a report shows it: relative to the project when inside it (reports do not name this
    machine's folders), else as given."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def run_command() -> str:
    """The command line of this benchmark run, as ``python benchmarks/run.py …`` (recorded in reports)."""
    return "python benchmarks/run.py " + " ".join(sys.argv[1:])


def report_head(title: str, report: dict, machine_details: str = "") -> list[str]:
    """The opening markdown lines of a benchmark report: ``# <title> — <date>``; the machine
    (:func:`machine_line`, then ``machine_details``) with the load averages at start and end; the command."""
    m = report["machine"]
    end = m.get("load_average_at_end", report.get("load_average_at_end"))
    lines = [f"# {title} — {report['date']}", "",
             f"Machine: **{machine_line(m)}**{machine_details}; load average (1/5/15 min) at start "
             f"{m.get('load_average_at_start')}, at end {end}.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    return lines


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(out)


def verification_table(results: dict[str, dict]) -> str:
    """One row per data set: accuracy ± std (%), TAR@FAR, AUC, threshold, pairs, fallbacks."""
    rows = []
    for name, r in results.items():
        rows.append([name, f"{_pct(r.get('accuracy'))} ± {_pct(r.get('accuracy_std'))}",
                     _pct(r.get("tar_at_far_1e-3")), _pct(r.get("tar_at_far_1e-4")), _fmt(r.get("roc_auc")),
                     _fmt(r.get("best_threshold_cosine"), 3), str(r.get("pairs")),
                     str(r.get("fallbacks", "–")), r.get("backend", "")])
    return table(["data set", "accuracy % (10-fold)", "TAR@FAR1e-3 %", "TAR@FAR1e-4 %", "ROC AUC",
                  "threshold (cos)", "pairs", "fallback crops", "backend"], rows)


def parity_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("skip_reason"):
            out.append([r["backend"], "–", "–", "–", f"not run: {r['skip_reason']}"])
        else:
            acc = f"{_pct(r.get('accuracy'))} ± {_pct(r.get('accuracy_std'))}" if r.get("accuracy") is not None else "–"
            out.append([r["backend"], _fmt(r.get("min_cosine"), 6), _fmt(r.get("mean_cosine"), 6), acc,
                        f"{r.get('device', '')} {r.get('file', '')}".strip()])
    return table(["backend", "min cos vs ref", "mean cos vs ref", "accuracy %", "notes"], out)


def latency_table(rows: list[dict]) -> str:
    by_backend: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_backend.setdefault(r["backend"], {})[r["batch"]] = r
    batches = sorted({r["batch"] for r in rows})
    header = ["backend"] + [f"b{b} p50/p95 ms" for b in batches] + [f"b{b} faces/s" for b in batches]
    out = []
    for name, d in by_backend.items():
        lat = [f"{d[b]['p50_ms']:.2f} / {d[b]['p95_ms']:.2f}" if b in d else "–" for b in batches]
        thr = [f"{d[b]['throughput_per_s']:.0f}" if b in d else "–" for b in batches]
        out.append([name] + lat + thr)
    return table(header, out)


def pipeline_section(pl: dict) -> str:
    """Markdown for the end-to-end timing (or why it was not run)."""
    if pl.get("skip_reason"):
        return f"## End-to-end pipeline\n\nNot run: {pl['skip_reason']}"
    return ("## End-to-end pipeline (detect → landmarks → warp → embed; decoded photos, one at a time)\n\n"
            + table(["photos", "size px", "p50 ms/photo", "p95 ms/photo", "photos/s", "faces found"],
                    [[str(pl["photos"]), str(pl["size_px"]), f"{pl['p50_ms']:.1f}", f"{pl['p95_ms']:.1f}",
                      f"{pl['photos_per_s']:.1f}", str(pl["faces_found"])]]))


def identification_section(i: dict) -> str:
    """Markdown for the identification result."""
    return "\n".join(["## Identification (TPR at FPR against distractors)", "",
                      table(["TPR@FPR1e-2", "TPR@FPR1e-3", "TPR@FPR1e-4", "query ids / images", "distractors"],
                            [[_pct(i.get("tpr_at_fpr_1e-2")), _pct(i.get("tpr_at_fpr_1e-3")),
                              _pct(i.get("tpr_at_fpr_1e-4")), f"{i['query_identities']} / {i['query_images']}",
                              str(i["distractor_images"])]]),
                      "", f"Construction: {i.get('construction', '')}"])


def to_markdown(report: dict) -> str:
    """The whole report as markdown."""
    m = report.get("machine", {})
    lines = [f"# facekit benchmark — {report.get('date', '')}", ""]
    if m:
        lines += [f"Machine: **{machine_line(m)}** ({m.get('os', '')}; " +
                  ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ")", ""]
    if m.get("load_average_at_start") is not None:
        lines += [f"Load average (1/5/15 min) at start: {m['load_average_at_start']}, at end: "
                  f"{m.get('load_average_at_end', '–')} — timings are wall-clock on this machine as it was.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    for key, value in report.get("models", {}).items():
        lines.append(f"- {key}: {value}")
    if report.get("models"):
        lines.append("")
    if report.get("verification"):
        lines += ["## Verification (insightface protocol: flip-summed embeddings, 10 contiguous folds)", "",
                  verification_table(report["verification"]), ""]
        for name, r in report["verification"].items():
            if r.get("crop_counts"):
                lines.append(f"- {name}: crops {r['crop_counts']}; alignment {r.get('alignment_seconds', '–')} s"
                             f"{' (cached)' if r.get('crops_from_cache') else ''}")
        lines.append("")
    if report.get("landmark_sources"):
        from benchmarks.landmark_sources import markdown as landmark_sources_markdown

        lines += [landmark_sources_markdown(report["landmark_sources"]), ""]
    if report.get("parity"):
        p = report["parity"]
        lines += [f"## Backend parity ({p.get('data', '')}; reference: {p.get('reference', '')})", "",
                  parity_table(p.get("rows", [])), ""]
    if report.get("latency"):
        lines += ["## Recognizer latency (preprocessing + model; random crops)", "", latency_table(report["latency"]), ""]
    if report.get("pipeline"):
        lines += [pipeline_section(report["pipeline"]), ""]
    if report.get("identification"):
        lines += [identification_section(report["identification"]), ""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"- [{k}]({v})" for k, v in report["plots"].items()] + [""]
    if report.get("timings"):
        rows = [[k, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}"] if isinstance(v, dict) else [k, f"{v:.1f}", "–"]
                for k, v in report["timings"].items()]
        lines += ["## Where the time went", "", table(["stage", "wall s", "CPU s (all threads)"], rows), ""]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def results_dir(args) -> Path | None:
    """Where a command writes its report: ``--results`` (default :data:`RESULTS_DIR`); None with ``--no-write``."""
    if getattr(args, "no_write", False):
        return None
    return Path(getattr(args, "results", None) or RESULTS_DIR)


def report_stem(info: dict, date: str | None = None) -> str:
    return f"{date or _dt.date.today().isoformat()}-{machine_slug(info)}"


def write_report(report: dict, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``<date>-<machine>.md`` and ``.json`` (plots already live in the ``<date>-<machine>/`` folder)."""
    return write_md_and_json(results_dir / report_stem(report["machine"], report.get("date")), to_markdown(report),
                             report)


def write_md_and_json(stem: str | Path, markdown: str, data: dict) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.json`` of one report, each written atomically; the JSON text is made first,
    so a value it cannot hold fails before either file is touched (numpy values and paths it can)."""
    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    stem = Path(stem)
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    atomic_write_bytes(md, markdown.encode())
    atomic_write_bytes(js, text.encode())
    return md, js


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

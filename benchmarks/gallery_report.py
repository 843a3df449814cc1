"""Markdown, JSON and the latency plot of the gallery benchmark (``benchmarks/gallery.py``)."""
from __future__ import annotations

from pathlib import Path

from benchmarks import report as rp

NOTES = (
    "Probes: LFW identities with ≥ 2 images; the first image of each is enrolled, the others are the queries.",
    "Distractors: synthetic — drawn from a Gaussian (mean + full covariance) fitted to the shipped recognizer's "
    "embeddings of the single-image LFW identities, then L2-normalised (MegaFace-style; not real faces).",
    "rank-1: the top-1 person is the probe's mate. TPR@FPR1e-3: the top-1 is the mate and scores above the "
    "cosine threshold that 0.1 % of probe–distractor pairs exceed (taken on the first 100,000 distractors: "
    "the same threshold at every size).",
    "recall@1 / @10: agreement of the index's top-1 / top-10 people with exact search (batched matrix products).",
    "Latency: Gallery.identify(embedding, top_k=10) per query, wall clock. One thread: BLAS and faiss limited to 1 "
    "thread. All threads: one calling thread per core, BLAS/faiss at the core count; qps is their total.",
    "Memory: a fresh process loads the saved gallery (+ index) and runs one query; 'gallery + index' is its "
    "resident memory minus the same process's before loading (Python, numpy and faiss imported).",
    "Build: Gallery.enroll_many of all rows (normalise, copy, build the index), wall and CPU seconds.",
)


def _ms(d: dict) -> str:
    return f"{d['p50_ms']:.3f} / {d['p99_ms']:.3f}"


def size_table(entry: dict) -> str:
    rows = []
    for r in entry["indexes"]:
        a = r["accuracy"]
        rows.append([r["kind"], f"{100 * a['rank1']:.2f}", f"{100 * a['tpr_at_fpr']:.2f}",
                     rp._fmt(a.get("recall_at_1")), rp._fmt(a.get("recall_at_10")), _ms(r["one_thread"]),
                     f"{r['one_thread']['cpu_ms_per_query']:.3f}", _ms(r["all_threads"]),
                     f"{r['all_threads']['qps']:.0f}", f"{r['build_s']:.1f} ({r['build_cpu_s']:.0f})",
                     f"{r['memory']['gallery_and_index_mb']:.0f} ({r['memory']['rss_mb']:.0f})",
                     f"{r['file_mb']:.1f} + {r['index_file_mb']:.1f}", f"{r['memory']['load']['seconds']:.2f}"])
    return rp.table(["index", "rank-1 %", "TPR@FPR1e-3 %", "recall@1", "recall@10", "1 thread p50 / p99 ms",
                     "CPU ms/query", "all threads p50 / p99 ms", "all threads qps", "build s (CPU s)",
                     "gallery + index MB (process RSS)", "files MB (gallery + index)", "load s"], rows)


def sweep_table(r: dict) -> str:
    field = "ef_search" if r["kind"] == "hnsw" else "nprobe"
    rows = [[str(s[field]), rp._fmt(s["recall_at_1"]), rp._fmt(s["recall_at_10"]), f"{100 * s['rank1']:.2f}",
             f"{s['p50_ms']:.3f} / {s['p99_ms']:.3f}", f"{s['cpu_ms_per_query']:.3f}"] for s in r["sweep"]]
    return rp.table([field, "recall@1", "recall@10", "rank-1 %", "1 thread p50 / p99 ms", "CPU ms/query"], rows)


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = rp.report_head("Gallery search benchmark", report,
                           f" ({m.get('os', '')}; faiss {report.get('faiss', '?')}, "
                           f"numpy {m.get('versions', {}).get('numpy', '?')})")
    lines += ["The machine is shared: wall-clock timings are as it was (CPU ms/query is less sensitive to other "
              "processes).", "",
              f"Probes: {report['probes']['identities']} enrolled identities, {report['probes']['queries']} queries. "
              f"Distractors: {report['distractor_model']}.", ""]
    for entry in report["sizes"]:
        lines += [f"## {entry['rows']:,} rows ({entry['distractors']:,} distractors; threshold at FPR 1e-3: cos "
                  f"{entry['threshold_cosine']})", "", size_table(entry), ""]
        for r in entry["indexes"]:
            if r.get("sweep"):
                lines += [f"{r['kind']} search settings (one thread):", "", sweep_table(r), ""]
    if report.get("crossover"):
        c = report["crossover"]
        kinds = [k[:-len("_p50_ms")] for k in c["points"][0] if k.endswith("_p50_ms")]
        lines += ["## Exact vs approximate search at small sizes (one thread, p50 ms)", "",
                  rp.table(["rows"] + kinds, [[f"{p['rows']:,}"] + [f"{p[f'{k}_p50_ms']:.3f}" for k in kinds]
                                              for p in c["points"]]), ""]
        lines += [f"{k} is at least {100 * c.get('margin', 0.1):.0f} % faster than exact from "
                  f"{c.get(f'{k}_faster_from_rows')} rows on ({c['queries']} queries per point)." for k in kinds[1:]]
        lines += [""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"- [{k}]({v})" for k, v in report["plots"].items()] + [""]
    lines += [f"- {n}" for n in NOTES]
    return "\n".join(lines).rstrip() + "\n"


def latency_plot(report: dict, folder: Path) -> str:
    from benchmarks import plots

    series: dict[str, tuple[list, list, list]] = {}
    for entry in report["sizes"]:
        for r in entry["indexes"]:
            s = series.setdefault(r["kind"], ([], [], []))
            s[0].append(entry["rows"])
            s[1].append(r["one_thread"]["p50_ms"])
            s[2].append(r["one_thread"]["p99_ms"])
    return plots.latency_vs_size(series, folder / "gallery-latency-vs-size.png",
                                 title=f"gallery query latency, one thread ({rp.machine_line(report['machine'])})")


def write(report: dict, results_dir: Path = rp.RESULTS_DIR) -> tuple[Path, Path]:
    """``<date>-<machine>-gallery.{md,json}`` and the plot in ``<date>-<machine>-gallery/``."""
    stem = rp.report_stem(report["machine"], report.get("date")) + "-gallery"
    folder = results_dir / stem
    png = Path(latency_plot(report, folder))
    report["plots"] = {"latency vs gallery size": f"{stem}/{png.name}"}
    return rp.write_md_and_json(results_dir / stem, to_markdown(report), report)

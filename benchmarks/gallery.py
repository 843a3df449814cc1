"""Gallery search at scale (MegaFace-style): exact, HNSW and IVF search over up to millions of rows.

Probes are real faces: LFW identities with at least two images; the first image of each is enrolled (its
*mate*), the others are queries. Distractors are synthetic: N embeddings drawn from a Gaussian (mean and full
covariance) fitted to the shipped recognizer's embeddings of the LFW identities with a single image (disjoint
from the probe identities), then L2-normalised. Each distractor is its own person. Sampling is prefix-stable
(chunk ``i`` is drawn from seed ``(SEED, i)``), so every gallery size shares its first distractors.

Per size and index: rank-1 identification rate (the top-1 person is the mate); TPR at FPR 1e-3 (the top-1 is the
mate *and* scores above the threshold that 0.1 % of probe–distractor pairs exceed, taken on the first
:data:`FPR_DISTRACTORS` distractors, so it is the same threshold at every size); recall@1 and @10 of the index
against exact search; query latency p50 / p99 on one thread and with all cores (one query per calling thread,
``cores`` threads); build time; resident memory of a fresh process that loads the saved gallery and index; file
sizes. Exact results come from one batched pass (matrix products); the single-query exact path is timed on
``exact_queries`` probes and checked against it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.child_process import child_env
from benchmarks.memory import status_mib
from evaluation.data import PROJECT_ROOT as ROOT
from runtime.cpu import usable_cores
from runtime.files import atomic_write, sha256_file
from runtime.gallery import Gallery
from runtime.gallery_index import IndexSpec
from runtime.gallery_index_file import index_files
from runtime.messages import last_line

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_INDEXES = ("exact", "hnsw", "ivf")
#: probes timed on the exact index's single-query path (the whole probe set is slow at 10⁶ rows)
EXACT_QUERIES = 300
#: Search settings swept per index kind (one thread, all probes), besides the default.
SWEEPS = {"hnsw": ("ef_search", (64, 128, 256, 512)), "ivf": ("nprobe", (16, 32, 48, 64, 96, 128))}
CROSSOVER_SIZES = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000)
CROSSOVER_KINDS = ("exact", "ivf", "hnsw")
#: An index counts as faster than exact search from the smallest size on which it and every larger size
#: measured are at least this much faster (p50, one thread).
CROSSOVER_MARGIN = 0.1
FPR = 1e-3
FPR_DISTRACTORS = 100_000
SEED = 0
CHUNK = 20_000
TOP = 10


@dataclass
class ProbeSet:
    """Enrolled mates, probe queries (with the index of their mate) and the rows the Gaussian is fitted to."""

    mates: np.ndarray
    mate_names: list[str]
    probes: np.ndarray
    probe_mate: np.ndarray
    fit: np.ndarray


def split_identities(emb: np.ndarray, identities: Sequence[str]) -> ProbeSet:
    """First image of each identity with ≥ 2 images → mate, its other images → probes; single images → fit."""
    counts = Counter(identities)
    mate_of: dict[str, int] = {}
    mates, probes, probe_mate, fit = [], [], [], []
    for i, name in enumerate(identities):
        if counts[name] < 2:
            fit.append(i)
        elif name not in mate_of:
            mate_of[name] = len(mates)
            mates.append(i)
        else:
            probes.append(i)
            probe_mate.append(mate_of[name])
    emb = np.asarray(emb, np.float32)
    return ProbeSet(emb[mates], list(mate_of), emb[probes], np.array(probe_mate, np.int64), emb[fit])


def fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Cholesky factor of the covariance of ``x`` (float64)."""
    x = np.asarray(x, np.float64)
    cov = np.cov(x, rowvar=False) + 1e-9 * np.eye(x.shape[1])
    return x.mean(0), np.linalg.cholesky(cov)


def sample_distractors(mean: np.ndarray, chol: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """``n`` unit vectors from the Gaussian, prefix-stable across ``n`` (chunk ``i`` from seed ``(seed, i)``)."""
    out = np.empty((n, len(mean)), np.float32)
    for c, start in enumerate(range(0, n, CHUNK)):
        rows = min(CHUNK, n - start)
        z = np.random.default_rng([seed, c]).standard_normal((rows, len(mean))) @ chol.T + mean
        out[start:start + rows] = z / np.linalg.norm(z, axis=1, keepdims=True)
    return out


def ground_truth(probes: np.ndarray, mates: np.ndarray, distractors: np.ndarray) -> dict:
    """Exact top-:data:`TOP` rows (mates first, then distractors) and similarities of every probe, and the
    FPR threshold from the probe–distractor scores of the first :data:`FPR_DISTRACTORS` distractors."""
    sims = probes @ mates.T
    top_rows = np.argsort(-sims, axis=1)[:, :TOP]
    top_sims = np.take_along_axis(sims, top_rows, 1)
    bins = 200_000
    hist = np.zeros(bins + 1, np.int64)
    for start in range(0, len(distractors), CHUNK):
        s = probes @ distractors[start:start + CHUNK].T
        if start < FPR_DISTRACTORS:
            hist += np.bincount(np.clip(((s + 1) * (bins / 2)).astype(np.int64), 0, bins).ravel(), minlength=bins + 1)
        part = np.argpartition(-s, TOP - 1, axis=1)[:, :TOP]
        rows = np.concatenate([top_rows, part + len(mates) + start], 1)
        vals = np.concatenate([top_sims, np.take_along_axis(s, part, 1)], 1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, :TOP]
        top_rows, top_sims = np.take_along_axis(rows, order, 1), np.take_along_axis(vals, order, 1)
    above = np.cumsum(hist[::-1])[::-1]  # pairs scoring at or above each bin
    allowed = FPR * hist.sum()
    edge = int(np.argmax(above <= allowed))  # the lowest bin with at most FPR of the pairs at or above it
    return {"rows": top_rows, "sims": top_sims, "threshold": edge / (bins / 2) - 1,
            "fpr_pairs": int(hist.sum())}


def accuracy(top_rows: np.ndarray, top_sims: np.ndarray, probe_mate: np.ndarray, threshold: float,
             exact_rows: np.ndarray | None = None) -> dict:
    """Rank-1, TPR at the threshold, and (given exact rows) recall@1 and recall@10 against them."""
    hit = top_rows[:, 0] == probe_mate
    out = {"rank1": float(hit.mean()), "tpr_at_fpr": float((hit & (top_sims[:, 0] >= threshold)).mean())}
    if exact_rows is not None:
        out["recall_at_1"] = float((top_rows[:, 0] == exact_rows[:, 0]).mean())
        out["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(top_rows, exact_rows)]))
    return out


def _percentiles(lat: list[float]) -> dict:
    a = np.asarray(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def run_queries(gallery: Gallery, queries: np.ndarray, row_of: dict[str, int], threads: int = 1) -> dict:
    """Identify every query (top :data:`TOP`) from ``threads`` threads; rows, sims and latencies."""
    rows = np.full((len(queries), TOP), -1, np.int64)
    sims = np.full((len(queries), TOP), -2.0, np.float32)
    lat = [0.0] * len(queries)

    def work(part: range) -> None:
        for i in part:
            t0 = time.perf_counter()
            res = gallery.identify(queries[i], top_k=TOP, threshold=-1.0)
            lat[i] = time.perf_counter() - t0
            for j, (name, sim) in enumerate(res):
                rows[i, j], sims[i, j] = row_of[name], sim
    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        work(range(len(queries)))
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, [range(t, len(queries), threads) for t in range(threads)]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows": rows, "sims": sims, **_percentiles(lat), "qps": round(len(queries) / wall, 1),
            "cpu_ms_per_query": round(cpu / len(queries) * 1e3, 4), "queries": len(queries)}


class Threads:
    """BLAS and faiss thread counts for one measurement (restored afterwards)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        import faiss

        self._limits = threadpool_limits(self.n)
        self._faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import faiss

        faiss.omp_set_num_threads(self._faiss)
        self._limits.restore_original_limits()
        return False


def loaded_memory(path: Path, spec: IndexSpec) -> dict:
    """Resident memory and load time of a fresh process that loads the saved gallery (and index) and queries it."""
    cmd = [sys.executable, "-m", "benchmarks.gallery", "--measure-load", str(path), json.dumps(spec.to_dict())]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"measuring the loaded gallery failed: {last_line(out.stderr)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mb() -> dict:
    return {key: round(status_mib(key), 1) for key in ("VmRSS", "VmHWM")}


def measure_load_main(path: str, spec_json: str) -> None:
    """Subprocess entry: load, one query, print RSS before / after and the load timings as one JSON line."""
    importlib.import_module("faiss")  # loaded before the baseline, as a server would have it

    before = _rss_mb()
    g = Gallery.load(path, index=json.loads(spec_json))
    g.identify(g.embeddings(g.names[0])[0], threshold=-1.0)
    after = _rss_mb()
    print(json.dumps({"rss_baseline_mb": before["VmRSS"], "rss_mb": after["VmRSS"], "peak_rss_mb": after["VmHWM"],
                      "gallery_and_index_mb": round(after["VmRSS"] - before["VmRSS"], 1),
                      "load": g.load_info, "index_kind": g.index_kind}))


def bench_index(kind_spec: IndexSpec, names: list[str], rows: np.ndarray, ps: ProbeSet, gt: dict,
                row_of: dict[str, int], exact_queries: int, workdir: Path, log: Callable[[str], None]) -> dict:
    """Build, query (one thread, all threads, sweeps), save and measure one index kind on one gallery."""
    cores = usable_cores()
    g = Gallery(index=kind_spec)
    t0, c0 = time.perf_counter(), time.process_time()
    g.enroll_many(names, rows)
    out = {"kind": g.index_kind, "spec": kind_spec.to_dict(), "rows": len(rows),
           "build_s": round(time.perf_counter() - t0, 2), "build_cpu_s": round(time.process_time() - c0, 2)}
    exact = g.index_kind == "exact"
    queries = ps.probes[:exact_queries] if exact else ps.probes
    with Threads(1):
        one = run_queries(g, queries, row_of)
    with Threads(cores):
        many = run_queries(g, queries, row_of, threads=cores)
    out["one_thread"] = {k: v for k, v in one.items() if k not in ("rows", "sims")}
    out["all_threads"] = {k: v for k, v in many.items() if k not in ("rows", "sims")} | {"threads": cores}
    n = len(queries)
    if exact:
        out["accuracy"] = accuracy(gt["rows"], gt["sims"], ps.probe_mate, gt["threshold"])
        out["single_query_matches_batched"] = float((one["rows"][:, 0] == gt["rows"][:n, 0]).mean())
    else:
        out["accuracy"] = accuracy(one["rows"], one["sims"], ps.probe_mate, gt["threshold"], gt["rows"])
        field, values = SWEEPS[out["kind"]]
        out["sweep"] = []
        for v in values:
            g.set_index(replace(kind_spec, **{field: v}))
            with Threads(1):
                r = run_queries(g, queries, row_of)
            out["sweep"].append({field: v, **{k: r[k] for k in ("p50_ms", "p99_ms", "cpu_ms_per_query")},
                                 **accuracy(r["rows"], r["sims"], ps.probe_mate, gt["threshold"], gt["rows"])})
        g.set_index(kind_spec)
    path = workdir / f"gallery-{len(rows)}-{out['kind']}.npz"
    t0 = time.perf_counter()
    g.save(path)
    out["save_s"] = round(time.perf_counter() - t0, 2)
    out["file_mb"] = round(path.stat().st_size / 2**20, 1)
    out["index_file_mb"] = round(sum(p.stat().st_size for p in index_files(path)) / 2**20, 1)
    del g
    out["memory"] = loaded_memory(path, kind_spec)
    for p in [path, *index_files(path)]:
        p.unlink(missing_ok=True)
    log(f"gallery {len(rows)} {out['kind']}: build {out['build_s']} s, p50 {one['p50_ms']:.3f} ms, "
        f"accuracy {out['accuracy']}, RSS {out['memory']['rss_mb']} MB")
    return out


def index_specs(kinds: Sequence[str]) -> list[IndexSpec]:
    return [IndexSpec.parse(k) for k in kinds]


def crossover(ps: ProbeSet, distractors: np.ndarray, queries: int, log: Callable[[str], None]) -> dict:
    """Exact vs IVF and HNSW single-thread p50 at small sizes: where each becomes faster than exact search."""
    rows_all = np.concatenate([ps.mates, distractors[:max(CROSSOVER_SIZES)]])
    names_all = ps.mate_names + [f"d{i}" for i in range(len(rows_all) - len(ps.mates))]
    row_of = {n: i for i, n in enumerate(names_all)}
    points = []
    for size in CROSSOVER_SIZES:
        point = {"rows": size}
        for kind in CROSSOVER_KINDS:
            g = Gallery(index=kind)
            g.enroll_many(names_all[:size], rows_all[:size])
            with Threads(1):
                point[f"{kind}_p50_ms"] = run_queries(g, ps.probes[:queries], row_of)["p50_ms"]
        points.append(point)
        log(f"crossover {point}")
    out = {"points": points, "queries": queries, "margin": CROSSOVER_MARGIN}
    for kind in CROSSOVER_KINDS[1:]:
        faster = [p[f"{kind}_p50_ms"] < (1 - CROSSOVER_MARGIN) * p["exact_p50_ms"] for p in points]
        from_here = [p["rows"] for i, p in enumerate(points) if all(faster[i:])]
        out[f"{kind}_faster_from_rows"] = from_here[0] if from_here else None
    return out


def run(emb: np.ndarray, identities: Sequence[str], sizes: Sequence[int] = DEFAULT_SIZES,
        kinds: Sequence[str] = DEFAULT_INDEXES, exact_queries: int = EXACT_QUERIES, with_crossover: bool = True,
        workdir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """The whole benchmark on real embeddings ``emb`` labelled ``identities``; a JSON-friendly dict."""
    import tempfile

    import faiss

    from benchmarks import report as rp

    info = rp.machine_info()
    ps = split_identities(emb, identities)
    mean, chol = fit_gaussian(ps.fit)
    distractors = sample_distractors(mean, chol, max(max(sizes), max(CROSSOVER_SIZES)))
    out = {"date": time.strftime("%Y-%m-%d"), "machine": info, "faiss": faiss.__version__,
           "probes": {"identities": len(ps.mates), "queries": len(ps.probes), "fit_rows": len(ps.fit)},
           "sizes": [], "distractor_model": "Gaussian (mean + full covariance) fitted to the shipped recognizer's "
                                            f"embeddings of {len(ps.fit)} single-image LFW identities, L2-normalised"}
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        if with_crossover:
            out["crossover"] = crossover(ps, distractors, min(300, len(ps.probes)), log)
        for n in sizes:
            t0 = time.perf_counter()
            gt = ground_truth(ps.probes, ps.mates, distractors[:n])
            names = ps.mate_names + [f"d{i}" for i in range(n)]
            row_of = {name: i for i, name in enumerate(names)}
            rows = np.concatenate([ps.mates, distractors[:n]])
            entry = {"distractors": n, "rows": len(rows), "threshold_cosine": round(gt["threshold"], 5),
                     "fpr_pairs": gt["fpr_pairs"], "ground_truth_s": round(time.perf_counter() - t0, 1), "indexes": []}
            log(f"gallery {len(rows)} rows: exact ground truth in {entry['ground_truth_s']} s")
            for spec in index_specs(kinds):
                entry["indexes"].append(bench_index(spec, names, rows, ps, gt, row_of, exact_queries, Path(tmp.name),
                                                    log))
            del rows, names, row_of
            out["sizes"].append(entry)
    finally:
        tmp.cleanup()
    info["load_average_at_end"] = rp.load_average()
    return out


def embeddings_cache_key(model: Path, image_keys: Sequence[str], extra: dict) -> str:
    parts = {"model": sha256_file(model), "images": list(image_keys), **extra}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_embeddings(cache: Path, key: str, compute: Callable[[], np.ndarray], use_cache: bool = True) -> np.ndarray:
    """``compute()``'s embeddings, cached as ``gallery-lfw-<key>.npz`` in ``cache`` (never committed)."""
    path = cache / f"gallery-lfw-{key}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as z:
                return z["embeddings"]
        except (OSError, ValueError, KeyError):
            pass
    emb = np.asarray(compute(), np.float32)
    if use_cache:
        atomic_write(path, lambda f: np.savez(f, embeddings=emb))
    return emb


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--measure-load":
    measure_load_main(sys.argv[2], sys.argv[3])

"""PNG pictures of benchmark results (matplotlib, Agg backend): ROC, cosine histograms, TPR@FPR, t-SNE."""
from __future__ import annotations

import os

import numpy as np

from benchmarks.report import machine_line
from evaluation.verification import RocCurve
from runtime.files import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> str:
    """Atomic PNG write."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        _plt().close(fig)
    return str(path)


def clients_axis(ax, clients: list[int]) -> None:
    """A log-2 x axis ticked at the client counts, y from 0, a light grid (results against concurrency)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def save_with_machine(fig, machine: dict, path: str | os.PathLike) -> str:
    """Title ``fig`` with the machine and its load average at start, lay it out and write it (:func:`_save`)."""
    fig.suptitle(f"{machine_line(machine)}; load average at start {machine.get('load_average_at_start')}",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def roc_curves(curves: dict[str, RocCurve | None], path, title: str = "ROC") -> str:
    """ROC curves (TPR vs FAR, log FAR axis); ``curves``: label → curve (None: not drawn)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, curve in curves.items():
        if curve is None:
            continue
        keep = curve.fpr > 0
        ax.plot(curve.fpr[keep], curve.tpr[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def cosine_histogram(cos_same: np.ndarray, cos_diff: np.ndarray, path, threshold: float | None = None,
                     title: str = "cosine similarity") -> str:
    """Histograms of same-identity and different-identity pair cosines, with the chosen threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 101)
    ax.hist(cos_diff, bins=bins, alpha=0.6, label=f"different ({len(cos_diff)})", color="tab:red", density=True)
    ax.hist(cos_same, bins=bins, alpha=0.6, label=f"same ({len(cos_same)})", color="tab:green", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def tpr_at_fpr_curve(curve: RocCurve, path, marks: dict[str, float] | None = None,
                     title: str = "identification: TPR at FPR") -> str:
    """TPR against FPR (log axis) for the query/distractor construction; ``marks`` annotates targets."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(curve.fpr, curve.tpr, marker=".", ms=3)
    for key, value in (marks or {}).items():
        ax.plot([float(key)], [value], "o", color="tab:red")
        ax.annotate(f"{value:.3f} @ {key}", (float(key), value), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate (query vs distractor)")
    ax.set_ylabel("true positive rate (same-identity queries)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def tsne_map(embeddings: np.ndarray, identities: list[str], path, n_identities: int = 30, max_per_identity: int = 20,
             seed: int = 0, title: str = "t-SNE of embeddings") -> str:
    """2-D t-SNE (scikit-learn) of the ``n_identities`` identities with the most images, one colour each."""
    from collections import Counter

    from sklearn.manifold import TSNE

    plt = _plt()
    counts = Counter(identities)
    chosen = [name for name, c in counts.most_common(n_identities) if c >= 2]
    idx, labels = [], []
    for name in chosen:
        members = [i for i, v in enumerate(identities) if v == name][:max_per_identity]
        idx.extend(members)
        labels.extend([name] * len(members))
    if len(idx) < 5:
        raise ValueError("too few labelled images for a t-SNE map")
    x = np.asarray(embeddings, np.float32)[idx]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # OpenMP threads make this small problem many times slower on a busy CPU
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(idx) - 1) / 3), init="pca", random_state=seed,
                  metric="cosine").fit_transform(x)
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>PX*"
    for k, name in enumerate(chosen):
        sel = np.array([lab == name for lab in labels])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=cmap(k % 20), marker=markers[(k // 20) % len(markers)],
                   label=name.replace("_", " "))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(chosen)} identities, {len(idx)} images)")
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, path)


def latency_vs_size(series: dict[str, tuple[list[int], list[float], list[float]]], path,
                    title: str = "gallery query latency") -> str:
    """Query latency against gallery size (log–log), one line per index: ``label → (sizes, p50 ms, p99 ms)``;
    p50 solid with dots, p99 dashed in the same colour."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, (label, (sizes, p50, p99)) in enumerate(series.items()):
        colour = f"C{k}"
        ax.plot(sizes, p50, marker="o", color=colour, label=f"{label} p50")
        ax.plot(sizes, p99, ls="--", color=colour, alpha=0.6, label=f"{label} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery rows")
    ax.set_ylabel("latency per query (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)

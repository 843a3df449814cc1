"""Face verification with insightface's protocol, exactly.

- Embeddings: the model's output for the crop plus its output for the horizontally flipped crop, summed,
  then L2-normalised (:func:`flip_sum_embeddings`).
- Distance: squared L2 between the two normalised embeddings of a pair (0 … 4); a pair is predicted
  "same" when ``distance < threshold``.
- Accuracy: thresholds ``np.arange(0, 4, 0.01)``; 10 contiguous folds (scikit-learn ``KFold`` without
  shuffling); on each fold the threshold with the best accuracy on the other 9 folds (first one on ties,
  ``np.argmax``) is applied to the held-out fold. Reported: mean and (population) std of the 10 fold
  accuracies.

Beyond insightface's table, and computed on all pairs pooled (documented, not cross-validated):
TAR at FAR 1e-3 / 1e-4 (the largest TAR whose FAR on the different-identity pairs is ≤ the target; with
3 000 different pairs FAR 1e-4 allows no false accept at all, see ``far_resolution``), ROC AUC, and the
best threshold on all pairs, also as a cosine (``cos = 1 − d²/2``) for ``FacePipeline.compare``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from runtime.preprocess import l2_normalize, mirror

#: insightface's squared-L2 threshold grid.
THRESHOLDS = np.arange(0, 4, 0.01)
#: The FAR targets reported as ``tar_at_far_<target>``.
FAR_TARGETS = (1e-3, 1e-4)


def flip_sum_embeddings(embed: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, batch_size: int = 64,
                        progress: str | None = None, return_parts: bool = False, workers: int = 1):
    """insightface test-time flip: ``normalize(embed(crop) + embed(fliplr(crop)))`` for N×H×W×3 crops.

    ``embed`` maps a uint8 crop batch to raw (unnormalised) embeddings. With ``return_parts`` the raw
    embeddings of the crops and of their flips are returned too: ``(fused, raw, raw_flipped)``.
    ``workers`` > 1 embeds that many batches concurrently (``embed`` must be thread-safe).
    """
    crops = np.asarray(crops)
    if crops.ndim != 4:
        raise ValueError(f"expected N×H×W×C crops, got shape {crops.shape}")

    def both(start: int) -> tuple[np.ndarray, np.ndarray]:
        batch = crops[start:start + batch_size]
        return np.asarray(embed(batch), dtype=np.float32), np.asarray(embed(mirror(batch)), dtype=np.float32)

    starts = range(0, len(crops), batch_size)
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers)
        results = pool.map(both, starts)
    else:
        pool, results = None, map(both, starts)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, desc=progress, unit="batch", leave=False, total=len(starts))
    try:
        parts = list(results)
    finally:
        if pool is not None:
            pool.shutdown()
    if parts:
        raw_a = np.concatenate([p[0] for p in parts])
        raw_b = np.concatenate([p[1] for p in parts])
    else:
        raw_a = raw_b = np.zeros((0, 0), np.float32)
    fused = l2_normalize(raw_a + raw_b) if len(raw_a) else raw_a
    return (fused, raw_a, raw_b) if return_parts else fused


def squared_distances(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each row pair (float32 embeddings stay float32, as in insightface)."""
    emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(f"embedding arrays must be N×D of one shape, got {emb_a.shape} and {emb_b.shape}")
    return np.sum(np.square(emb_a - emb_b), axis=1)


def contiguous_folds(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of ``KFold(n_folds, shuffle=False)``: contiguous test blocks, in order."""
    from sklearn.model_selection import KFold

    if n < n_folds:
        raise ValueError(f"need at least {n_folds} pairs for {n_folds}-fold evaluation, got {n}")
    return [(tr, te) for tr, te in KFold(n_splits=n_folds, shuffle=False).split(np.arange(n))]


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold test accuracy and the threshold chosen on the other folds (insightface ``calculate_roc``)."""
    dist = np.asarray(dist, np.float64)
    issame = np.asarray(issame, bool)
    correct = (dist[None, :] < np.asarray(thresholds)[:, None]) == issame[None, :]  # T×N
    accs, chosen = [], []
    for train, test in contiguous_folds(len(dist), n_folds):
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        chosen.append(thresholds[best])
        accs.append(correct[best, test].mean())
    return np.asarray(accs), np.asarray(chosen)


def tar_at_far(dist: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float, float]:
    """(TAR, achieved FAR, squared-L2 threshold) for the loosest threshold whose FAR is ≤ ``far``.

    All pairs pooled; "same" means ``dist < threshold``.
    """
    dist = np.asarray(dist, np.float64)
    issame = np.asarray(issame, bool)
    neg = np.sort(dist[~issame])
    pos = dist[issame]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("TAR@FAR needs both same and different pairs")
    allowed = int(np.floor(far * len(neg) + 1e-9))  # false accepts we may make
    threshold = neg[allowed] if allowed < len(neg) else np.inf  # accepts exactly the `allowed` smallest
    achieved = float(np.mean(neg < threshold))
    return float(np.mean(pos < threshold)), achieved, float(threshold)


def best_threshold(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[float, float]:
    """The grid threshold with the best accuracy on all pairs (first on ties) and that accuracy."""
    correct = (np.asarray(dist)[None, :] < np.asarray(thresholds)[:, None]) == np.asarray(issame, bool)[None, :]
    acc = correct.mean(axis=1)
    i = int(np.argmax(acc))
    return float(thresholds[i]), float(acc[i])


def cosine_from_squared_l2(d2: float) -> float:
    """The cosine similarity of unit vectors at squared-L2 distance ``d2``: ``1 − d2 / 2``."""
    return 1.0 - float(d2) / 2.0


class RocCurve(NamedTuple):
    """A curve of true positive rate against false positive rate, point by point."""

    fpr: np.ndarray
    tpr: np.ndarray


@dataclass
class VerificationResult:
    """Everything the protocol reports; ``to_dict`` gives the JSON fields (ROC arrays left out)."""

    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    best_threshold: float
    best_threshold_cosine: float
    tar_at_far: dict[str, float | None]
    far_achieved: dict[str, float | None]
    roc_auc: float | None
    pairs: int
    same_pairs: int
    diff_pairs: int
    roc: RocCurve | None = field(repr=False, default=None)
    dist: np.ndarray = field(repr=False, default=None)
    issame: np.ndarray = field(repr=False, default=None)

    @property
    def far_resolution(self) -> float | None:
        """The smallest non-zero FAR these pairs can measure (1 / different pairs)."""
        return 1.0 / self.diff_pairs if self.diff_pairs else None

    def to_dict(self) -> dict:
        d = {
            "accuracy": round(self.accuracy, 6),
            "accuracy_std": round(self.accuracy_std, 6),
            "best_threshold": round(self.best_threshold, 4),
            "best_threshold_cosine": round(self.best_threshold_cosine, 4),
            "roc_auc": _round(self.roc_auc, 6),
            "pairs": self.pairs,
            "same_pairs": self.same_pairs,
            "diff_pairs": self.diff_pairs,
            "far_resolution": self.far_resolution,
            "fold_accuracies": [round(a, 6) for a in self.fold_accuracies],
            "fold_thresholds": [round(t, 4) for t in self.fold_thresholds],
        }
        for key, value in self.tar_at_far.items():
            d[f"tar_at_far_{key}"] = _round(value, 6)
            d[f"far_achieved_{key}"] = _round(self.far_achieved[key], 8)
        return d


def _round(value, digits):
    return None if value is None else round(float(value), digits)


def far_key(far: float) -> str:
    """``1e-3`` → ``"1e-3"`` (the suffix of the JSON field names)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def evaluate(emb_a: np.ndarray, emb_b: np.ndarray, issame, n_folds: int = 10,
             far_targets: tuple[float, ...] = FAR_TARGETS) -> VerificationResult:
    """Run the protocol on the L2-normalised embeddings of each pair's two images (protocol order).

    With only one kind of pair (e.g. a tiny all-same ``.bin``), accuracy is still computed; TAR@FAR, ROC
    and AUC are ``None``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    issame = np.asarray(issame, dtype=bool).reshape(-1)
    dist = squared_distances(emb_a, emb_b)
    if len(dist) != len(issame):
        raise ValueError(f"{len(dist)} embedding pairs but {len(issame)} is-same labels")
    accs, chosen = kfold_accuracy(dist, issame, n_folds)
    thr, _ = best_threshold(dist, issame)
    both = bool(issame.any() and (~issame).any())  # TAR@FAR and the ROC need same and different pairs
    tars, fars = {}, {}
    for far in far_targets:
        tar, achieved, _ = tar_at_far(dist, issame, far) if both else (None, None, None)
        tars[far_key(far)], fars[far_key(far)] = tar, achieved
    return VerificationResult(
        accuracy=float(np.mean(accs)), accuracy_std=float(np.std(accs)),
        fold_accuracies=[float(a) for a in accs], fold_thresholds=[float(t) for t in chosen],
        best_threshold=thr, best_threshold_cosine=cosine_from_squared_l2(thr),
        tar_at_far=tars, far_achieved=fars, roc_auc=float(roc_auc_score(issame, -dist)) if both else None,
        pairs=int(len(dist)), same_pairs=int(issame.sum()), diff_pairs=int((~issame).sum()),
        roc=RocCurve(*roc_curve(issame, -dist)[:2]) if both else None, dist=dist, issame=issame,
    )


def quick_verify(embed: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, pairs: np.ndarray, issame,
                 batch_size: int = 64) -> dict:
    """The check a training run makes every few steps: flip-summed embeddings of ``crops``, the mean
    cosine of same / different ``pairs`` and the 10-fold accuracy (the best-threshold accuracy on all pairs
    when there are fewer than 10 pairs)."""
    issame = np.asarray(issame, bool)
    emb = flip_sum_embeddings(embed, crops, batch_size)
    a, b = emb[pairs[:, 0]], emb[pairs[:, 1]]
    cos = np.sum(a * b, axis=1)
    result = {"pairs": int(len(issame)),
              "cos_same": float(cos[issame].mean()) if issame.any() else float("nan"),
              "cos_diff": float(cos[~issame].mean()) if (~issame).any() else float("nan")}
    if len(issame) >= 10:
        r = evaluate(a, b, issame, n_folds=10)
        result.update(accuracy=r.accuracy, threshold_cosine=r.best_threshold_cosine, protocol="10-fold")
    else:
        thr = np.unique(cos)
        acc = [((cos >= t) == issame).mean() for t in thr]
        i = int(np.argmax(acc))
        result.update(accuracy=float(acc[i]), threshold_cosine=float(thr[i]), protocol="best-threshold")
    return result


def mean_verification(results: dict[str, dict]) -> dict:
    """Several :func:`quick_verify` results (name → result) summarised: the mean of their accuracy,
    threshold and same / different cosines (what a training run ranks checkpoints by, as arcface_torch
    reports LFW, CFP-FP and AgeDB-30 side by side), and the per-set results under ``"sets"``."""
    if not results:
        raise ValueError("mean_verification needs at least one result")
    keys = ("accuracy", "threshold_cosine", "cos_same", "cos_diff")
    out = {k: float(np.mean([r[k] for r in results.values()])) for k in keys}
    out["pairs"] = int(sum(r["pairs"] for r in results.values()))
    out["sets"] = dict(results)
    return out

"""Identification rate: TPR at a fixed FPR against a distractor set (the course projects' metric).

Construction on a labelled image set (LFW by default): identities with at least ``min_images`` images are
the *queries*; every image of the other identities is a *distractor* (so no distractor shares a query's
identity). Negative scores are the cosine similarities of every query image with every distractor image;
for each target FPR the threshold is the score that at most that fraction of negatives exceeds. Positive
scores are all same-identity query–query pairs; TPR is the fraction of them above the threshold.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .verification import RocCurve, far_key

FPR_TARGETS = (1e-2, 1e-3, 1e-4)


@dataclass
class IdentificationResult:
    tpr_at_fpr: dict[str, float]
    thresholds: dict[str, float]
    query_identities: int
    query_images: int
    distractor_images: int
    positive_pairs: int
    negative_pairs: int
    min_images: int
    curve: RocCurve | None = field(repr=False, default=None)

    def to_dict(self) -> dict:
        d = {f"tpr_at_fpr_{k}": round(v, 6) for k, v in self.tpr_at_fpr.items()}
        d.update({f"threshold_cosine_at_fpr_{k}": round(v, 6) for k, v in self.thresholds.items()})
        d.update(query_identities=self.query_identities, query_images=self.query_images,
                 distractor_images=self.distractor_images, positive_pairs=self.positive_pairs,
                 negative_pairs=self.negative_pairs, min_images=self.min_images,
                 construction=f"queries: identities with >= {self.min_images} images; distractors: all images of "
                              "the other identities; threshold from query-vs-distractor cosines; TPR over "
                              "same-identity query-query pairs")
        return d


def split_queries(identities: list[str], min_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of query images (identities with ≥ ``min_images``) and of distractor images (the rest)."""
    counts = Counter(identities)
    is_query = np.array([counts[i] >= min_images for i in identities])
    return np.flatnonzero(is_query), np.flatnonzero(~is_query)


def threshold_at_fpr(negatives_sorted_desc: np.ndarray, fpr: float) -> float:
    """The cosine threshold that at most ``fpr`` of the negatives exceed ("same" means score > threshold)."""
    allowed = int(np.floor(fpr * len(negatives_sorted_desc) + 1e-9))
    return float(negatives_sorted_desc[min(allowed, len(negatives_sorted_desc) - 1)])


def evaluate_identification(embeddings: np.ndarray, identities: list[str], min_images: int = 4,
                            fpr_targets=FPR_TARGETS, curve_points: int = 60) -> IdentificationResult:
    """TPR@FPR for L2-normalised ``embeddings`` (one per image) labelled by ``identities``."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if len(emb) != len(identities):
        raise ValueError(f"{len(emb)} embeddings for {len(identities)} identity labels")
    q, d = split_queries(identities, min_images)
    if len(q) < 2 or len(d) == 0:
        raise ValueError(f"need query identities with >= {min_images} images and distractors; got {len(q)} query "
                         f"images and {len(d)} distractors")
    neg = (emb[q] @ emb[d].T).ravel()
    neg = -np.sort(-neg)  # descending
    qid = np.asarray(identities, dtype=object)[q]
    sims = emb[q] @ emb[q].T
    iu = np.triu_indices(len(q), k=1)
    same = qid[iu[0]] == qid[iu[1]]
    pos = sims[iu][same]
    tprs, thrs = {}, {}
    for f in fpr_targets:
        t = threshold_at_fpr(neg, f)
        tprs[far_key(f)] = float(np.mean(pos > t))
        thrs[far_key(f)] = t
    lo = max(1.0 / len(neg), 1e-7)
    grid = np.logspace(np.log10(lo), 0, curve_points)
    curve_tpr = np.array([np.mean(pos > threshold_at_fpr(neg, f)) for f in grid])
    return IdentificationResult(tprs, thrs, int(len(set(qid))), int(len(q)), int(len(d)), int(len(pos)),
                                int(len(neg)), min_images, RocCurve(grid, curve_tpr))

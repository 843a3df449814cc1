"""The 10-fold verification protocol, TAR@FAR and identification rate against plain brute-force versions."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.identification import evaluate_identification
from evaluation.verification import THRESHOLDS, evaluate, flip_sum_embeddings, kfold_accuracy, tar_at_far


def generated_pairs(n_pairs: int, dim: int = 32, noise: float = 0.9, seed: int = 0):
    """L2-normalised embedding pairs: same pairs share an identity vector, different pairs do not."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n_pairs) < 0.5
    ident = rng.normal(size=(n_pairs, dim))
    a = ident + noise * rng.normal(size=(n_pairs, dim))
    b = np.where(issame[:, None], ident + noise * rng.normal(size=(n_pairs, dim)), rng.normal(size=(n_pairs, dim)))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float32), b.astype(np.float32), issame


def brute_force_10fold(emb_a, emb_b, issame, n_folds=10):
    """insightface's protocol written out with plain loops: contiguous folds (the first n % k folds one
    pair longer), threshold grid 0..4 step 0.01, best (first) threshold on the other folds, accuracy on this one."""
    n = len(issame)
    dist = []
    for i in range(n):
        d = 0.0
        for x, y in zip(emb_a[i], emb_b[i]):
            d += float(x - y) ** 2
        dist.append(d)
    sizes = [n // n_folds + (1 if k < n % n_folds else 0) for k in range(n_folds)]
    starts = [sum(sizes[:k]) for k in range(n_folds)]
    thresholds = [k * 0.01 for k in range(400)]
    accuracies, chosen = [], []
    for k in range(n_folds):
        test = set(range(starts[k], starts[k] + sizes[k]))
        train = [i for i in range(n) if i not in test]
        best_acc, best_thr = -1.0, None
        for t in thresholds:
            correct = sum(1 for i in train if (dist[i] < t) == bool(issame[i]))
            acc = correct / len(train)
            if acc > best_acc:
                best_acc, best_thr = acc, t
        chosen.append(best_thr)
        accuracies.append(sum(1 for i in test if (dist[i] < best_thr) == bool(issame[i])) / len(test))
    mean = sum(accuracies) / n_folds
    std = (sum((a - mean) ** 2 for a in accuracies) / n_folds) ** 0.5
    return mean, std, accuracies, chosen, dist


@pytest.mark.parametrize("n_pairs,noise,seed", [(600, 0.9, 0), (613, 1.2, 1), (250, 0.6, 2)])
def test_kfold_matches_brute_force(n_pairs, noise, seed):
    a, b, issame = generated_pairs(n_pairs, noise=noise, seed=seed)
    mean, std, accs, chosen, _ = brute_force_10fold(a, b, issame)
    res = evaluate(a, b, issame)
    assert 0.55 < mean < 1.0  # the generated data is neither trivial nor random
    assert res.accuracy == pytest.approx(mean, abs=1e-12)
    assert res.accuracy_std == pytest.approx(std, abs=1e-12)
    assert res.fold_accuracies == pytest.approx(accs, abs=1e-12)
    assert res.fold_thresholds == pytest.approx(chosen, abs=1e-9)
    assert res.pairs == n_pairs and res.same_pairs == int(issame.sum())


def test_threshold_grid_and_cosine_form():
    assert len(THRESHOLDS) == 400 and THRESHOLDS[0] == 0 and THRESHOLDS[-1] == pytest.approx(3.99)
    a, b, issame = generated_pairs(600, seed=3)
    res = evaluate(a, b, issame)
    assert res.best_threshold_cosine == pytest.approx(1 - res.best_threshold / 2)
    # the cosine threshold classifies exactly like the squared-L2 one (cos > t_cos  <=>  d² < t)
    cos = np.sum(a.astype(np.float64) * b, axis=1)
    d2 = np.sum((a.astype(np.float64) - b) ** 2, axis=1)
    away = np.abs(d2 - res.best_threshold) > 1e-5
    assert np.array_equal((cos > res.best_threshold_cosine)[away], (d2 < res.best_threshold)[away])


def test_tar_at_far_matches_brute_force():
    a, b, issame = generated_pairs(2000, noise=1.1, seed=4)
    dist = np.sum((a - b) ** 2, axis=1)
    neg = dist[~issame]
    pos = dist[issame]
    for far in (1e-3, 1e-2, 0.1):
        best = 0.0
        for t in sorted(set(dist.tolist())) + [np.inf]:  # every distinct operating point
            if np.mean(neg < t) <= far:
                best = max(best, float(np.mean(pos < t)))
        tar, achieved, _ = tar_at_far(dist, issame, far)
        assert tar == pytest.approx(best)
        assert achieved <= far
    res = evaluate(a, b, issame)
    assert set(res.tar_at_far) == {"1e-3", "1e-4"}
    assert res.to_dict()["tar_at_far_1e-3"] == pytest.approx(tar_at_far(dist, issame, 1e-3)[0], abs=1e-6)
    assert 0.5 < res.roc_auc <= 1.0


def test_perfect_and_single_class_sets():
    a, b, issame = generated_pairs(400, noise=0.05, seed=5)
    res = evaluate(a, b, issame)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0 and res.roc_auc == 1.0
    only_same = np.ones(20, bool)
    res = evaluate(a[:20], a[:20], only_same)  # identical embeddings: distance 0 < every threshold but 0
    assert res.accuracy == 1.0 and res.roc_auc is None and res.to_dict()["tar_at_far_1e-3"] is None
    with pytest.raises(ValueError):
        evaluate(a[:5], b[:5], issame[:5])  # fewer pairs than folds


def test_flip_sum_embeddings_sums_raw_outputs_then_normalises():
    rng = np.random.default_rng(6)
    crops = rng.integers(0, 256, size=(9, 4, 5, 3), dtype=np.uint8)
    weights = rng.normal(size=(4 * 5 * 3, 7))

    def embed(batch):
        return batch.reshape(len(batch), -1).astype(np.float64) @ weights

    fused = flip_sum_embeddings(embed, crops, batch_size=4)
    assert np.array_equal(fused, flip_sum_embeddings(embed, crops, batch_size=4, workers=3))  # order kept
    for i in range(len(crops)):
        raw = embed(crops[i:i + 1])[0] + embed(crops[i:i + 1, :, ::-1])[0]
        assert np.allclose(fused[i], raw / np.linalg.norm(raw), atol=1e-5)


def test_kfold_accuracy_uses_strict_less_than():
    dist = np.array([0.5] * 10 + [0.7] * 10)
    issame = np.array([True] * 10 + [False] * 10)
    accs, chosen = kfold_accuracy(dist, issame)
    assert np.all(accs == 1.0)
    assert np.all((np.array(chosen) > 0.5) & (np.array(chosen) <= 0.7))


def test_identification_matches_brute_force():
    rng = np.random.default_rng(7)
    names, vecs = [], []
    for k in range(40):
        center = rng.integers(-3, 4, size=16)
        n = 5 if k < 12 else 1 + k % 3  # 12 query identities, the rest distractors
        for _ in range(n):
            names.append(f"id{k}")
            vecs.append(center + rng.integers(-2, 3, size=16))
    emb = np.asarray(vecs, np.float32) / 8  # small dyadic values: every dot product is exact in float32
    res = evaluate_identification(emb, names, min_images=4, fpr_targets=(1e-2, 1e-1))
    counts = {n: names.count(n) for n in names}
    q = [i for i in range(len(names)) if counts[names[i]] >= 4]
    d = [i for i in range(len(names)) if counts[names[i]] < 4]
    neg = sorted((float(emb[i] @ emb[j]) for i in q for j in d), reverse=True)
    pos = [float(emb[i] @ emb[j]) for x, i in enumerate(q) for j in q[x + 1:] if names[i] == names[j]]
    assert res.query_images == len(q) and res.distractor_images == len(d) and res.positive_pairs == len(pos)
    for far, key in ((1e-2, "1e-2"), (1e-1, "1e-1")):
        # the threshold lets through at most far·N negatives
        t = res.thresholds[key]
        assert sum(s > t for s in neg) <= far * len(neg)
        assert res.tpr_at_fpr[key] == pytest.approx(sum(s > t for s in pos) / len(pos))

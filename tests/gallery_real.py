"""Real face embeddings for the gallery index tests (not a test module).

The shipped recognizer's embeddings of LFW: all 7,701 images from the gallery benchmark's cache when it is
there (``benchmarks/run.py gallery`` writes it under ``$FACEKIT_CACHE``), else a subset embedded here through
``FacePipeline`` (a few seconds). Plus synthetic rows from a Gaussian fitted to them, as the benchmark draws
its distractors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUBSET_IDENTITIES = 150  # identities with ≥ 2 images embedded when there is no cache (2 images each)
SUBSET_SINGLES = 100


@dataclass
class RealFaces:
    mates: np.ndarray  # one enrolled embedding per identity
    names: list[str]
    probes: np.ndarray  # other images of those identities
    probe_names: list[str]
    all: np.ndarray  # every real embedding (for fitting distractors)
    source: str


def _from_cache(lfw: Path):
    from benchmarks import gallery as bg
    from runtime.shipped import RECOGNIZER as SHIPPED_RECOGNIZER
    from evaluation import crops as ec
    from evaluation import pairs as ep

    pairset = ep.load_lfw(lfw)
    key = bg.embeddings_cache_key(SHIPPED_RECOGNIZER, pairset.image_keys(),
                                  {"landmarks": "detector", "detector": None, "aligner": None})
    path = ec.cache_dir() / f"gallery-lfw-{key}.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        emb = z["embeddings"]
    return (emb, pairset.identities) if len(emb) == len(pairset.identities) else None


def _embed_subset(lfw: Path):
    from evaluation import pairs as ep
    from runtime.pipeline import FacePipeline

    pairset = ep.load_lfw(lfw)
    counts = Counter(pairset.identities)
    multi: dict[str, list[int]] = {}
    singles: list[int] = []
    for i, name in enumerate(pairset.identities):
        if counts[name] < 2:
            singles.append(i)
        elif len(multi.setdefault(name, [])) < 2:
            multi[name].append(i)
    picks = sorted([i for rows in list(multi.values())[:SUBSET_IDENTITIES] for i in rows] + singles[:SUBSET_SINGLES])
    pipe = FacePipeline()
    emb = np.stack([pipe.subject_face(str(pairset.images[i])).embedding for i in picks]).astype(np.float32)
    return emb, [pairset.identities[i] for i in picks]


def real_faces(lfw: Path) -> RealFaces:
    found = _from_cache(lfw)
    source = "benchmark cache (all LFW images)"
    if found is None:
        found, source = _embed_subset(lfw), "LFW subset embedded by the test"
    emb, ids = found
    counts = Counter(ids)
    first: dict[str, int] = {}
    probes, probe_names = [], []
    for i, name in enumerate(ids):
        if counts[name] < 2:
            continue
        if name not in first:
            first[name] = i
        else:
            probes.append(i)
            probe_names.append(name)
    return RealFaces(emb[list(first.values())], list(first), emb[probes], probe_names, emb, source)


def synthetic_like(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors from a Gaussian fitted to ``real`` (the benchmark's distractor model)."""
    from benchmarks import gallery as bg

    mean, chol = bg.fit_gaussian(real)
    return bg.sample_distractors(mean, chol, n, seed=seed)

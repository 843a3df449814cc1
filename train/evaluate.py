"""The trainer's periodic verification check: the crops of its pair set and their quick accuracy.

The pair set is an insightface ``.bin`` or an aligned LFW tree (``train/make_aligned.py`` output) with its
``pairs.txt``; the score is :func:`evaluation.verification.quick_verify` (insightface's 10-fold protocol).
The full benchmark (TAR@FAR, ROC, CFP, raw photos through the pipeline) is ``benchmarks/run.py``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from evaluation.crops import prealigned_crops
from evaluation.pairs import PairSet, first_pairs, load_pairset, restrict
from runtime.preprocess import RECOGNIZER_SPEC, PreprocessSpec


def load_eval_set(kind: str, path: str | Path, pairs_file: str | Path | None = None, max_pairs: int = 0,
                  spec: PreprocessSpec = RECOGNIZER_SPEC) -> tuple[PairSet, np.ndarray]:
    """``(pair set, its aligned uint8 BGR crops in spec's framing)`` for a ``.bin`` (``kind="bin"``) or an
    aligned LFW tree (``kind="lfw"``: pairs whose image is missing are skipped with a warning).

    ``max_pairs`` keeps that many, alternating same / different pairs. The tree's crops are taken as
    aligned; crops of another size are resized (and a warning says the figure is then indicative only).
    """
    ps = load_pairset(kind, path, pairs_file, skip_missing=True)
    ps = restrict(ps, first_pairs(ps.issame, max_pairs)) if max_pairs else ps
    ps = dataclasses.replace(ps, aligned=True)
    crops, _ = prealigned_crops(ps, spec, progress=False, warn_resize=kind == "lfw")
    return ps, crops

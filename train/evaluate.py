"""The trainer's periodic verification check: the crops of its pair sets and their quick accuracy.

A pair set is an insightface ``.bin`` (LFW, CFP-FP, AgeDB-30, …; ``eval.path`` may list several) or an aligned
LFW tree (``train/make_aligned.py`` output) with its ``pairs.txt``; the score is
:func:`evaluation.verification.quick_verify` (insightface's 10-fold protocol), several sets ranked by their
mean (:func:`evaluation.verification.mean_verification`). The full benchmark (TAR@FAR, ROC, CFP, raw photos
through the pipeline) is ``benchmarks/run.py``.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from evaluation.crops import prealigned_crops
from evaluation.errors import DatasetError
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


def set_name(ps: PairSet, path: str | Path) -> str:
    """A column-safe name for a pair set (``lfw``, ``cfp_fp``, ``agedb_30``)."""
    name = getattr(ps, "name", None) or Path(path).stem
    return re.sub(r"[^0-9A-Za-z_]+", "_", str(name)).strip("_").lower() or "set"


def load_eval_sets(e: dict, expand: Callable[[str], Path]) -> list[tuple[str, PairSet, np.ndarray]]:
    """``[(name, pair set, crops), ...]`` for the ``eval`` config section (``path``: one path or a list of
    ``.bin`` files). With ``optional`` a missing set is skipped with a warning."""
    paths = e["path"] if isinstance(e["path"], list) else [e["path"]]
    out: list[tuple[str, PairSet, np.ndarray]] = []
    for p in paths:
        try:
            ps, crops = load_eval_set(e["format"], expand(p), expand(e["pairs"]), e["max_pairs"])
        except DatasetError as err:
            if not e["optional"]:
                raise
            warnings.warn(f"evaluation set skipped: {err}", stacklevel=2)
            continue
        name = set_name(ps, p)
        while name in {n for n, _, _ in out}:
            name += "_"
        out.append((name, ps, crops))
    return out

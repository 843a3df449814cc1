"""Verification accuracy with each landmark source side by side, next to the aligner's NME on 300-W test.

The default benchmark run (``python benchmarks/run.py``) calls :func:`compare_landmark_sources`: LFW,
CFP-FP and CFP-FF, each with the crops warped from the detector's 5 points and from
``FacePipeline(landmarks="aligner")``'s points (the shipped aligner as the runtime runs it, its fallback
rule included), embedded by the same recognizer with the insightface protocol; and NME / failure rate on
``landmarks_300w/test`` of those points, of the aligner's own points and of the detector's. A landmark
source that costs recognition accuracy shows here, whatever its NME.

Crops are cached (:func:`evaluation.crops.aligned_crops`); embeddings already computed by the run are
passed in and reused, and each image is embedded once per source even where data sets share it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.verification import evaluate, flip_sum_embeddings
from runtime import shipped

SOURCES = ("detector", "aligner")


def _pair_sets(data: Path) -> tuple[dict[str, ep.PairSet], list[str]]:
    """The LFW / CFP-FP / CFP-FF pair sets under ``data`` and notes for the missing ones."""
    sets, missing = ep.standard_pair_sets(data, ["LFW", "CFP-FP", "CFP-FF"])
    notes: list[str] = []
    for name, folder in missing.items():  # CFP-FP and CFP-FF share one folder: one note for both
        note = f"landmark sources: {ep.missing_set_note(name, folder)}"
        if note not in notes:
            notes.append(note)
    return sets, notes


def source_accuracy(sets: dict[str, ep.PairSet], aligner: ec.FaceAligner, embedder, known: dict[str, np.ndarray],
                    use_cache: bool = True, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Accuracy of each pair set with ``aligner``'s landmarks; ``known`` maps image paths to fused
    embeddings already computed with this source (filled in as images are embedded)."""
    out = {}
    for name, pairset in sets.items():
        keys = [str(p) for p in pairset.images]
        todo = [i for i, k in enumerate(keys) if k not in known]
        if todo:
            crops = ec.aligned_crops(pairset, aligner, use_cache=use_cache, progress=progress, spec=embedder.spec)
            fused = flip_sum_embeddings(embedder, crops.crops[todo], batch_size=getattr(embedder, "batch_size", 64),
                                        progress=f"{name}: embed ({aligner.landmarks} points)" if progress else None,
                                        workers=getattr(embedder, "workers", 1))
            known.update(zip((keys[i] for i in todo), fused))
        emb = np.stack([known[k] for k in keys])
        res = evaluate(emb[pairset.pairs[:, 0]], emb[pairset.pairs[:, 1]], pairset.issame)
        out[name] = {"accuracy": round(res.accuracy, 6), "accuracy_std": round(res.accuracy_std, 6),
                     "pairs": res.pairs, "roc_auc": None if res.roc_auc is None else round(res.roc_auc, 6)}
    return out


def landmark_nme(data: Path, aligner_model: str | None, progress: bool = True) -> dict[str, Any] | None:
    """NME / failure rate on ``landmarks_300w/test`` of the runtime's aligner points (fallback rule applied),
    the aligner's own points and the detector's (:func:`benchmarks.landmarks.landmark_accuracy`); None
    without the data."""
    from benchmarks.landmarks import landmark_accuracy

    test = data / "landmarks_300w" / "test"
    return landmark_accuracy(test, aligner_model, progress) if test.is_dir() else None


def compare_landmark_sources(data: Path, embedder, known: dict[str, dict[str, np.ndarray]] | None = None,
                             detector_model: str | None = None, aligner_model: str | None = None,
                             use_cache: bool = True, progress: bool = True,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The report section (JSON-able): accuracy per pair set and landmark source, NME on 300-W test.

    ``known`` maps a source name to {image path: fused embedding} the caller already computed with it.
    """
    sets, notes = _pair_sets(data)
    known = {s: dict((known or {}).get(s, {})) for s in SOURCES}
    accuracy: dict[str, dict] = {}
    for source in SOURCES:
        try:
            aligner = ec.FaceAligner(detector_model=detector_model, landmarks=source, aligner_model=aligner_model)
        except FileNotFoundError as e:
            notes.append(f"landmark sources: {source} skipped: {e}")
            continue
        log(f"landmark sources: {source} points on {', '.join(sets) or 'no data set'}")
        accuracy[source] = source_accuracy(sets, aligner, embedder, known[source], use_cache, progress)
    section = {"accuracy": accuracy, "sets": list(sets), "recognizer": str(getattr(embedder, "path", "")),
               "aligner_model": aligner_model or str(shipped.ALIGNER), "notes": notes}
    if "aligner" in accuracy:
        section["nme_300w_test"] = landmark_nme(data, aligner_model, progress)
    return section


def _pct(r: dict | None) -> str:
    return "–" if r is None else f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"


def markdown(section: dict[str, Any]) -> str:
    """The section as markdown: one row per landmark source, the data sets and NME side by side."""
    nme = section.get("nme_300w_test") or {}
    labels = {"detector": "detector's 5 points", "aligner": f"aligner ({Path(section['aligner_model']).name}, "
                                                            "as FacePipeline(landmarks=\"aligner\") runs it)"}
    sets = section["sets"]
    lines = ["## Landmark sources: recognition accuracy and landmark NME", "",
             "| landmarks | " + " | ".join(f"{s} accuracy %" for s in sets)
             + " | NME 300-W test | failure rate (NME > 10 %) |",
             "|---|" + "---|" * (len(sets) + 2)]
    for source, label in labels.items():
        acc = section["accuracy"].get(source)
        if acc is None:
            continue
        r = nme.get(source)
        tail = f"{100 * r['nme']:.2f} % | {100 * r['failure_rate']:.1f} %" if r else "– | –"
        lines.append(f"| {label} | " + " | ".join(_pct(acc.get(s)) for s in sets) + f" | {tail} |")
    raw = nme.get("aligner_raw")
    if raw:
        lines += ["", f"The aligner's own points (no fallback to the detector's) on 300-W test: NME "
                      f"{100 * raw['nme']:.2f} %, failure rate {100 * raw['failure_rate']:.1f} % "
                      f"({nme['images']} faces)."]
    lines += ["", "Same recognizer, same detector boxes, insightface protocol (10 folds, mean ± std)."]
    lines += [f"- {n}" for n in section.get("notes", [])]
    return "\n".join(lines)

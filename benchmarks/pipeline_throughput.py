"""Pipeline throughput over a folder: ``FacePipeline.embed`` one photo at a time next to ``embed_many``, and
optionally the folder indexer (in-process, several processes, Ray) on celeba/wild.

    python benchmarks/run.py throughput [--data LFW_DIR] [--images 1000] [--rounds 5] [--indexer-images 600]

Both embedding paths run on the same pipeline object (same models, same backend, same threads) over the
same files (decoding included). The photos are cut into ``rounds`` chunks and each chunk is timed with
both paths, alternating which goes first, so a change of machine load during the run hits both alike; the
ratio is the sum of the chunk times. Equality: every face's cosine between the two paths' embeddings.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import report as rp
from runtime.cpu import usable_cores


def _time(fn: Callable[[], list]) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def embed_throughput(pipe, files: Sequence[str], rounds: int = 5, **many: Any) -> dict:
    """photos/s and faces/s of ``pipe.embed`` per photo vs ``pipe.embed_many(files, **many)``, and the
    lowest cosine between their embeddings of the same face."""
    pipe.embed(files[0])
    list(pipe.embed_many(files[:8], **many))  # warm both paths up
    chunks = np.array_split(np.asarray(files, dtype=object), max(1, rounds))
    single_s = many_s = 0.0
    single, batched = [], []
    for i, chunk in enumerate(chunks):
        one = lambda: [pipe.embed(str(p)) for p in chunk]  # noqa: E731
        multi = lambda: list(pipe.embed_many([str(p) for p in chunk], **many))  # noqa: E731
        if i % 2:
            dm, rm = _time(multi)
            ds, rs = _time(one)
        else:
            ds, rs = _time(one)
            dm, rm = _time(multi)
        single_s, many_s = single_s + ds, many_s + dm
        single += rs
        batched += rm
    errors = [r.source for r in batched if not r.ok]
    cos, count_mismatch = [], 0
    for ref, res in zip(single, batched):
        if len(ref) != len(res.faces):
            count_mismatch += 1
            continue
        cos += [float(np.dot(a.embedding, b.embedding)) for a, b in zip(ref, res.faces)]
    faces = sum(len(r) for r in single)
    return {"photos": len(files), "faces": faces, "rounds": len(chunks),
            "one_at_a_time": {"seconds": round(single_s, 2), "photos_per_s": round(len(files) / single_s, 2),
                              "faces_per_s": round(faces / single_s, 2)},
            "embed_many": {"seconds": round(many_s, 2), "photos_per_s": round(len(files) / many_s, 2),
                           "faces_per_s": round(sum(len(r.faces) for r in batched) / many_s, 2),
                           "options": {k: v for k, v in many.items() if v is not None}},
            "speedup": round(single_s / many_s, 3), "min_cosine": round(min(cos), 7) if cos else None,
            "face_count_mismatches": count_mismatch, "errors": errors}


def indexer_throughput(wild: Path, list_file: Path, images: int, modes: Sequence[str]) -> list[dict]:
    """Wall-clock photos/s of the indexer over the first ``images`` lines of ``list_file`` (start-up of
    processes / Ray included), for each mode: ``in-process``, ``2 processes``, ``ray (local)``."""
    from runtime.indexer import IndexJob, IndexPlan, entries_from_list, in_process, in_processes, run_index

    lines = [ln for ln in Path(list_file).read_text().splitlines() if ln.strip()][:images]
    rows = []
    with tempfile.TemporaryDirectory(prefix="facekit-index-bench-") as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("\n".join(lines) + "\n")
        plan = IndexPlan(entries_from_list(listing), IndexJob(str(wild)))
        for mode in modes:
            if mode == "ray (local)":
                try:
                    from runtime.ray_indexer import on_ray

                    compute = on_ray("local", init_options={"num_cpus": usable_cores()})
                except ImportError as e:
                    rows.append({"mode": mode, "skip_reason": str(e)})
                    continue
            else:
                compute = in_processes(2) if mode == "2 processes" else in_process
            out = Path(tmp) / mode.replace(" ", "_").strip("()") / "g.npz"
            t0 = time.perf_counter()
            summary = run_index(plan, out, compute=compute, progress=False, log=lambda m: None)
            wall = time.perf_counter() - t0
            rows.append({"mode": mode, "images": summary.images, "enrolled": summary.enrolled_images,
                         "seconds": round(wall, 1), "photos_per_s": round(summary.images / wall, 2)})
            shutil.rmtree(out.parent, ignore_errors=True)
    return rows


def to_markdown(result: dict) -> str:
    """The throughput report as markdown."""
    e = result["embed"]
    lines = rp.report_head("facekit pipeline throughput", result)
    lines += [f"## embed_many vs embed, one photo at a time ({e['photos']} LFW photos, {e['faces']} faces, same "
              f"pipeline, decoding included, {e['rounds']} interleaved rounds)", "",
              rp.table(["path", "seconds", "photos/s", "faces/s"],
                       [["embed, one photo at a time", f"{e['one_at_a_time']['seconds']:.1f}",
                         f"{e['one_at_a_time']['photos_per_s']:.2f}", f"{e['one_at_a_time']['faces_per_s']:.2f}"],
                        [f"embed_many {e['embed_many']['options']}", f"{e['embed_many']['seconds']:.1f}",
                         f"{e['embed_many']['photos_per_s']:.2f}", f"{e['embed_many']['faces_per_s']:.2f}"]]),
              "", f"Speed-up: **{e['speedup']:.2f}×**; lowest cosine between the two paths' embeddings of a face: "
                  f"**{e['min_cosine']}**; photos whose face count differs: {e['face_count_mismatches']}.", ""]
    if result.get("indexer"):
        lines += ["## Indexer on celeba/wild (wall clock, start-up included)", "",
                  rp.table(["mode", "images", "enrolled", "seconds", "photos/s"],
                           [[r["mode"], str(r.get("images", "–")), str(r.get("enrolled", "–")),
                             f"{r['seconds']:.1f}" if "seconds" in r else r.get("skip_reason", "–"),
                             f"{r['photos_per_s']:.2f}" if "photos_per_s" in r else "–"]
                            for r in result["indexer"]]), ""]
    return "\n".join(lines)


__all__ = ["embed_throughput", "indexer_throughput", "to_markdown"]

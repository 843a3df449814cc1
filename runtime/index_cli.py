"""``python -m runtime index ROOT --out gallery.npz``: the command line of :mod:`runtime.indexer`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import indexer
from .field_options import FieldOptions
from .files import existing_folder

#: the options that set an :class:`indexer.IndexJob` field
JOB = FieldOptions(indexer.IndexJob)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def job_from_args(args) -> indexer.IndexJob:
    """The indexing job the options describe (model paths made absolute: workers may run elsewhere)."""
    pipeline = {"recognizer": _absolute(args.recognizer), "detector": _absolute(args.detector),
                "aligner": _absolute(args.aligner), "landmarks": args.landmarks, "backend": args.backend,
                "score_threshold": args.score_threshold}
    return JOB.build(args, root=str(Path(args.root).resolve()),
                     pipeline={k: v for k, v in pipeline.items() if v is not None})


def cmd_index(args) -> int:
    if args.processes > 1 and args.ray:
        raise indexer.IndexingError("--processes and --ray exclude each other (Ray runs its own actors)")
    if args.batch_size < 1:
        raise indexer.IndexingError(f"--batch-size must be at least 1, got {args.batch_size}")
    existing_folder(args.root, indexer.IndexingError)
    entries = indexer.entries_from_list(args.list) if args.list else indexer.entries_from_tree(args.root)
    plan = indexer.IndexPlan(entries, job_from_args(args), shard_size=args.shard_size)
    if args.ray:
        from .ray_indexer import on_ray

        compute = on_ray(args.ray, actors=args.actors)
    elif args.processes > 1:
        compute = indexer.in_processes(args.processes)
    else:
        compute = indexer.in_process
    if compute is not indexer.in_process:  # in-process loads the models before any work anyway
        plan.job.make_pipeline().recognizer  # a missing or foreign model is reported before workers start
    summary = indexer.run_index(plan, args.out, manifest=args.manifest, work=args.work, compute=compute,
                                restart=args.restart, keep_parts=args.keep_parts, progress=args.progress)
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    failed = ", ".join(f"{reason} {n}" for reason, n in summary.failures.items()) or "none"
    print(f"indexed {summary.images} images of {summary.people} people: {summary.enrolled_images} enrolled "
          f"({summary.enrolled_people} people); not enrolled: {failed}")
    print(f"gallery {summary.gallery}, manifest {summary.manifest} "
          f"({summary.computed_shards} shards computed, {summary.reused_shards} reused)")
    return 0


def add_index_command(sub, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``index`` on the ``python -m runtime`` subparsers ``sub``."""
    x = sub.add_parser("index", parents=parents, help="embed a folder of people into a gallery (resumable)",
                       description="Embed the subject face of every image of a folder-per-person tree (or of a "
                                   "--list file) into a gallery, with a manifest line per image. Killed runs "
                                   "resume where they stopped.")
    x.add_argument("root", help="image folder: ROOT/<name>/<image>, or the folder the --list paths are relative to")
    x.add_argument("--out", required=True, help="gallery .npz to write")
    x.add_argument("--list", help="list file of '<path> <name>' lines (paths relative to ROOT)")
    x.add_argument("--manifest", help="manifest (JSON lines) to write (default: <out stem>.manifest.jsonl)")
    x.add_argument("--work", help="folder for the finished shards (default: <out>.parts; removed at the end)")
    x.add_argument("--keep-parts", action="store_true", help="keep the work folder after the gallery is written")
    x.add_argument("--restart", action="store_true", help="discard the work of an earlier, different run")
    x.add_argument("--processes", type=int, default=1, help="worker processes, one model thread each (default 1)")
    x.add_argument("--ray", metavar="ADDRESS", help="run on Ray: 'local' starts a local cluster, else e.g. 'auto' "
                                                    "or ray://HOST:10001 (needs the 'ray' extra)")
    x.add_argument("--actors", type=int, help="Ray actors (default: one per cluster CPU)")
    x.add_argument("--shard-size", type=int, default=indexer.DEFAULT_SHARD_SIZE,
                   help=f"images per shard, the unit of resuming (default {indexer.DEFAULT_SHARD_SIZE})")
    JOB.add(x, "batch_size", "threads", "min_face", "dominance", "retry_threshold")
    x.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    x.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    x.set_defaults(func=cmd_index)

"""Indexing on Ray: the shards of an :class:`~runtime.indexer.IndexPlan` as a Ray Data pipeline.

``ray.data.from_items`` holds one row per shard still to compute (its index and its entries);
``map_batches`` sends the rows to :class:`ShardEmbedder` actors, each holding one
:class:`~runtime.pipeline.FacePipeline` on one CPU thread, which return the shard files' bytes; the driver
writes them, and the indexer's own assembly turns them into the gallery, so a Ray run gives the gallery of a
local run. Only this module imports Ray (the ``ray`` extra: ``pip install 'facekit[ray]'``). On a cluster,
every node needs facekit installed and the image root readable at the same path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Iterator, Sequence

import numpy as np

from .indexer import Compute, Entry, IndexingError, IndexJob, IndexPlan, compute_shard
from .optional_imports import require_module


class ShardEmbedder:
    """A Ray Data actor: one pipeline (one model thread, decoding inline) that computes whole shards."""

    def __init__(self, job: IndexJob, plan_id: str):
        self.job = dataclasses.replace(job, threads=0)
        self.plan_id = plan_id
        self.pipeline = job.make_pipeline(threads=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, data = [], []
        for k, entries in zip(batch["shard"], batch["entries"]):
            items = [Entry(path, name) for path, name in json.loads(entries)]
            shards.append(int(k))
            data.append(compute_shard(self.pipeline, self.job, self.plan_id, int(k), items))
        out = np.empty(len(data), dtype=object)
        out[:] = data
        return {"shard": np.asarray(shards, np.int64), "data": out}


def _import_ray():
    """The ray module with its Data library (a separate part of the ray package), or an IndexingError."""
    require_module("ray.data", IndexingError, "--ray needs Ray Data: pip install 'facekit[ray]' (or 'ray[data]')")
    import ray

    return ray


def on_ray(address: str | None = None, actors: int | None = None, init_options: dict[str, Any] | None = None
           ) -> Compute:
    """A :data:`~runtime.indexer.Compute` running the shards on Ray with ``actors`` actors (default: one per
    CPU of the cluster). It uses the Ray session already started in this process, else starts one:
    ``address`` "local" (or None) starts a local cluster, anything else ("auto", "ray://host:10001")
    connects to that cluster; that session ends with the run."""

    def compute(plan: IndexPlan, todo: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        if not todo:
            return
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            options = {"include_dashboard": False, "logging_level": logging.WARNING, **(init_options or {})}
            ray.init(address=None if address in (None, "local") else address, **options)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the indexer draws its own
            n = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
            rows = [{"shard": k, "entries": json.dumps([[e.path, e.name] for e in plan.shard(k)])} for k in todo]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            ds = ds.map_batches(ShardEmbedder, fn_constructor_args=(plan.job, plan.plan_id), batch_size=1,
                                batch_format="numpy", num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(size=min(n, len(rows))))
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                for k, data in zip(batch["shard"], batch["data"]):
                    yield int(k), bytes(data)
        finally:
            if started:
                ray.shutdown()

    return compute


__all__ = ["ShardEmbedder", "on_ray"]

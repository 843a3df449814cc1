"""Training throughput and start-up at scale, measured on this machine (``python benchmarks/run.py training``).

* ``ranks``: images/s of the trainer (its ``log.csv``) in 1 process and in 2 CPU processes (gloo, torchrun),
  same per-process batch; the second run's figure is the global rate.
* ``loader``: images/s one DataLoader worker prepares with float32 transfer (normalised in the worker, the
  old path) and with uint8 transfer (the crop as is; normalised on the device), in the same run, plus the
  main-process cost of that normalisation here (on a GPU it is a kernel) and the bytes per batch that go
  through shared memory.
* ``rec-open``: opening an MS1MV2-shaped RecordIO set (5,822,653 images, 85,742 identities; a generated
  ``.idx`` and a sparse ``.rec`` holding only the header, a few images and the identity records): seconds
  and peak memory of one process, first open (parse + sidecars) and later opens, and the code before the
  numpy index (``--old-rev``, read from git) for comparison.

Timing runs should hold ``flock /tmp/facekit-bench.lock``. Results: ``benchmarks/results/<date>-<machine>-training``.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks import report as rp
from benchmarks.child_process import child_env
from evaluation.data import PROJECT_ROOT as ROOT
from runtime.files import atomic_write
from runtime.ports import free_port

MS1MV2_IMAGES, MS1MV2_IDENTITIES = 5_822_653, 85_742
#: Spacing of the generated image records (≈ MS1MV2's mean JPEG record); the .rec is sparse, nothing is written.
RECORD_BYTES = 6_500
#: what ``run`` can measure: loader images/s, trainer images/s on 1 and 2 ranks, ``.rec`` start-up
PARTS = ("loader", "ranks", "rec-open")


# ------------------------------------------------------------------------------------------ ranks
def _train_run(tmp: Path, nproc: int, steps: int, batch: int) -> dict:
    out = tmp / f"run{nproc}"
    over = ["arch=mobilefacenet", "backbone_kwargs={width: 0.25}", "embedding_size=128", "data.format=synthetic",
            "data.synthetic={identities: 200, per_identity: 8, seed: 0}", f"data.batch_size={batch}", "data.workers=0",
            "train.device=cpu", "train.threads=1", "train.progress=false", "train.tensorboard=false",
            "train.checkpoint_every=0", "train.log_every=5", f"schedule.steps={steps}", "eval.format=none",
            f"output={out}"]
    script = [str(ROOT / "train" / "arcface.py"), "--config", str(ROOT / "train" / "configs" / "smoke.yaml"),
              "--overwrite", *over]
    env = child_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *script]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"training run with {nproc} process(es) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(out / "log.csv") as f:
        rows = [float(r["images_per_s"]) for r in csv.DictReader(f) if r["images_per_s"]]
    steady = rows[1:] or rows  # the first window includes start-up
    return {"processes": nproc, "batch_per_process": batch, "steps": steps, "images_per_s": float(np.median(steady)),
            "windows": rows, "wall_s": round(time.time() - t0, 1)}


def measure_ranks(steps: int = 30, batch: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        one, two = _train_run(Path(tmp), 1, steps, batch), _train_run(Path(tmp), 2, steps, batch)
    return {"one": one, "two": two, "ratio_two_over_one": two["images_per_s"] / one["images_per_s"]}


# ------------------------------------------------------------------------------------------ loader
def measure_loader(batches: int = 25, batch: int = 128) -> dict:
    import torch

    from train.datasets import FaceDataset, SyntheticSource, worker_init
    from train.device_input import DeviceNormalizer
    from train.samplers import ShuffleBatchSampler

    torch.set_num_threads(1)
    src = SyntheticSource(identities=64, per_identity=8)
    rows = {}
    for transfer in ("float32", "uint8"):  # the old path first, then the new one, in this one run
        ds = FaceDataset(src, "flip", cache="decoded", progress=False, output=transfer)
        sampler = ShuffleBatchSampler(len(ds), batch, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=1, prefetch_factor=2,
                                             worker_init_fn=worker_init, multiprocessing_context="fork",
                                             persistent_workers=True)
        it, images, seen = iter(loader), 0, None
        next(it)  # worker start-up
        t0 = time.perf_counter()
        while images < batches * batch:
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            images += len(b["label"])
            seen = b
        dt = time.perf_counter() - t0
        row = {"images_per_s_per_worker": images / dt, "batch_bytes": int(seen["image"].numel() * seen["image"].element_size()),
               "dtype": str(seen["image"].dtype)}
        if transfer == "uint8":
            norm, t1, n = DeviceNormalizer(device="cpu"), time.perf_counter(), 10
            for _ in range(n):
                norm(seen["image"])
            row["cpu_normalise_images_per_s"] = n * len(seen["label"]) / (time.perf_counter() - t1)
        rows[transfer] = row
        del it, loader
    rows["speedup_uint8_over_float32"] = rows["uint8"]["images_per_s_per_worker"] / rows["float32"]["images_per_s_per_worker"]
    rows["shared_memory_ratio"] = rows["uint8"]["batch_bytes"] / rows["float32"]["batch_bytes"]
    rows["workers_for_10k_img_s"] = {t: 10_000 / rows[t]["images_per_s_per_worker"] for t in ("float32", "uint8")}
    return rows


# ------------------------------------------------------------------------------------------ rec-open
def write_ms1m_shaped(folder: Path, images: int = MS1MV2_IMAGES, identities: int = MS1MV2_IDENTITIES) -> Path:
    """``train.idx`` + sparse ``train.rec`` shaped like MS1MV2 (kept across runs); returns the .rec path."""
    from train.recordio import IRHeader, _write_one, pack_record
    from train.synthetic import identity_sample

    rec, idx = folder / "train.rec", folder / "train.idx"
    if rec.is_file() and idx.is_file():
        return rec
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    first_id, end = images + 1, images + 1 + identities
    bounds = np.linspace(1, first_id, identities + 1).astype(np.int64)  # identity i: keys bounds[i]..bounds[i+1]-1
    offsets = np.empty(end, np.int64)
    offsets[0] = 0
    offsets[1:first_id] = 4096 + RECORD_BYTES * np.arange(images, dtype=np.int64)
    id_start = 4096 + RECORD_BYTES * images
    offsets[first_id:] = id_start + 40 * np.arange(identities, dtype=np.int64)
    def write_rec(f) -> None:
        _write_one(f, pack_record(IRHeader(2, np.array([first_id, end], np.float32), 0, 0), b""))
        for k in range(1, 9):  # a few real images at the front (the dataset decodes the first one)
            f.seek(int(offsets[k]))
            jpg = cv2.imencode(".jpg", identity_sample(0, k), [cv2.IMWRITE_JPEG_QUALITY, 60])[1].tobytes()
            assert len(jpg) < RECORD_BYTES - 64, len(jpg)
            _write_one(f, pack_record(IRHeader(0, 0.0, k, 0), jpg))
        f.seek(id_start)
        for i in range(identities):
            _write_one(f, pack_record(IRHeader(2, np.array([bounds[i], bounds[i + 1]], np.float32), 0, 0), b""))

    def write_idx(f) -> None:
        keys = np.arange(end, dtype=np.int64)
        for a in range(0, end, 1 << 20):
            b = min(end, a + (1 << 20))
            f.write("".join(f"{k}\t{o}\n" for k, o in zip(keys[a:b].tolist(), offsets[a:b].tolist())).encode())

    atomic_write(rec, write_rec)
    atomic_write(idx, write_idx)
    return rec


_OPEN_PROBE = r"""
import json, sys, time, tracemalloc
import numpy as np
mode, rec = sys.argv[1], sys.argv[2]
if mode == "old":
    import old_recordio as m
    import old_samplers as sm
else:
    from train.datasets import FaceDataset, RecordSource
    import train.samplers as sm

from benchmarks.memory import status_mib as status

try:  # reset the peak-RSS counter (Linux): VmHWM then measures this open only
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = status("VmRSS")
tracemalloc.start()
t0, c0 = time.perf_counter(), time.process_time()
if mode == "old":  # the pre-change RecordSource: dict index, keys and labels as Python strings
    r = m.RecordIOReader(rec)
    keys, labels = r.image_keys_and_labels()
    str_keys = [str(int(k)) for k in keys]
    raw = [str(int(v)) for v in labels]
    names = sorted(set(raw), key=lambda s: (0, int(s), s))
    lookup = {n: i for i, n in enumerate(names)}
    lab = np.array([lookup[x] for x in raw], dtype=np.int64)
    n, classes = len(str_keys), len(names)
else:
    src = RecordSource(rec)
    ds = FaceDataset(src, "flip", cache="none", progress=False, data_format="rec")
    n, classes = len(ds), src.num_classes
open_s, open_cpu = time.perf_counter() - t0, time.process_time() - c0
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
hwm, rss = status("VmHWM"), status("VmRSS")
t1, c1 = time.perf_counter(), time.process_time()
s = sm.ShuffleBatchSampler(n, 128, seed=0, rank=0, world_size=8)
first = next(iter(s))  # the epoch's order (old: the whole per-rank batch list) and the first batch
epoch_s, epoch_cpu = time.perf_counter() - t1, time.process_time() - c1
print(json.dumps({"mode": mode, "samples": n, "classes": classes, "open_s": open_s, "open_cpu_s": open_cpu,
                  "traced_peak_mb": peak / 2**20, "rss_peak_growth_mb": hwm - base, "rss_after_mb": rss - base,
                  "epoch_order_s": epoch_s, "epoch_order_cpu_s": epoch_cpu}))
"""


def measure_rec_open(folder: Path, old_rev: str | None = "main") -> dict:
    """Open the MS1MV2-shaped set in fresh processes: first (no sidecar), again (sidecar), and the old code."""
    rec = write_ms1m_shaped(folder)
    for p in folder.glob(".train.idx.*.facekit.npy"):
        p.unlink()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        modes = ["first", "again"]
        if old_rev:
            src = subprocess.run(["git", "show", f"{old_rev}:train/recordio.py"], cwd=ROOT, capture_output=True, text=True)
            smp = subprocess.run(["git", "show", f"{old_rev}:train/samplers.py"], cwd=ROOT, capture_output=True, text=True)
            if src.returncode == 0 and "RecordIndex" not in src.stdout and smp.returncode == 0:
                (Path(tmp) / "old_recordio.py").write_text(src.stdout)
                (Path(tmp) / "old_samplers.py").write_text(smp.stdout)
                modes.append("old")
            else:
                rows["old"] = {"skipped": f"git show {old_rev}:train/recordio.py is not the dict-index reader"}
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", _OPEN_PROBE, mode, str(rec)], cwd=ROOT,
                                 env=child_env(tmp),  # tmp: the old reader, for mode "old"
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"rec-open ({mode}) failed:\n{out.stderr[-3000:]}")
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows["idx_mb"] = (folder / "train.idx").stat().st_size / 2**20
    return rows


# ------------------------------------------------------------------------------------------ report
def to_markdown(report: dict, machine_line: str) -> str:
    lines = [f"# Training throughput and start-up — {report['date']}", "", f"Machine: {machine_line}; load average "
             f"at start {report['machine'].get('load_average_at_start')}, at end {report.get('load_average_at_end')}.", ""]
    r = report.get("ranks")
    if r:
        lines += ["## Trainer images/s, 1 vs 2 CPU processes (gloo), MobileFaceNet width 0.25, batch "
                  f"{r['one']['batch_per_process']} per process", "", "| processes | images/s (median of log windows) |",
                  "|---|---|", f"| 1 | {r['one']['images_per_s']:.1f} |", f"| 2 | {r['two']['images_per_s']:.1f} |",
                  "", f"2 processes / 1: **{r['ratio_two_over_one']:.2f}×** (on {report['machine']['cores']} cores "
                  "shared with other work; not a GPU figure).", ""]
    ld = report.get("loader")
    if ld:
        lines += ["## One DataLoader worker, batches of 128, `augment: flip`, decoded cache", "",
                  "| transfer | images/s per worker | bytes per batch in shared memory |", "|---|---|---|"]
        for t in ("float32", "uint8"):
            lines.append(f"| {t} | {ld[t]['images_per_s_per_worker']:.0f} | {ld[t]['batch_bytes']:,} |")
        lines += ["", f"uint8 / float32: **{ld['speedup_uint8_over_float32']:.2f}×** images/s per worker, "
                  f"{ld['shared_memory_ratio']:.2f}× the bytes. Normalising a uint8 batch on this CPU (main process): "
                  f"{ld['uint8']['cpu_normalise_images_per_s']:.0f} images/s (on a GPU it is one kernel). Workers for "
                  f"10 k images/s: {ld['workers_for_10k_img_s']['float32']:.1f} (float32) vs "
                  f"{ld['workers_for_10k_img_s']['uint8']:.1f} (uint8).", ""]
    ro = report.get("rec_open")
    if ro:
        lines += [f"## Opening an MS1MV2-shaped RecordIO set ({MS1MV2_IMAGES:,} images, {MS1MV2_IDENTITIES:,} identities, "
                  f".idx {ro['idx_mb']:.0f} MB, sparse .rec)", "",
                  "| open | wall s | CPU s | peak traced MB | peak RSS growth MB | RSS kept MB | epoch order + first batch, "
                  "wall / CPU s |", "|---|---|---|---|---|---|---|"]
        for mode, label in (("first", "first (parse + sidecars)"), ("again", "again (memory-mapped sidecars)"),
                            ("old", "before (dict index, string keys)")):
            m = ro.get(mode)
            if m and "open_s" in m:
                lines.append(f"| {label} | {m['open_s']:.2f} | {m['open_cpu_s']:.2f} | {m['traced_peak_mb']:.0f} | "
                             f"{m['rss_peak_growth_mb']:.0f} | {m['rss_after_mb']:.0f} | {m['epoch_order_s']:.2f} / "
                             f"{m['epoch_order_cpu_s']:.2f} |")
        lines.append("")
    lines += [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def report_name(info: dict, only: Sequence[str]) -> str:
    """``<date>-<machine>-training``; a run of some parts only names them, so it never replaces a full report."""
    parts = [p for p in PARTS if p in only]
    return f"{rp.report_stem(info)}-training" + ("" if len(parts) == len(PARTS) else "-" + "-".join(parts))


def run(only: Sequence[str], results_dir: Path | None, rec_dir: Path | None, steps: int, old_rev: str | None) -> dict:
    """Measure the parts ``only`` names, print the report and write it under ``results_dir`` (None: nowhere)."""
    info = rp.machine_info()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": info, "notes": []}
    if "loader" in only:
        report["loader"] = measure_loader()
    if "ranks" in only:
        report["ranks"] = measure_ranks(steps)
    if "rec-open" in only:
        from evaluation.crops import cache_dir

        report["rec_open"] = measure_rec_open(rec_dir or cache_dir() / "bench" / "ms1m_shaped", old_rev)
    report["load_average_at_end"] = rp.load_average()
    report["notes"].append("No GPU here: these are CPU figures; NCCL and GPU throughput were not measured.")
    md = to_markdown(report, rp.machine_line(info))
    if results_dir is not None:
        rp.write_md_and_json(results_dir / report_name(info, only), md, report)
    print(md)
    return report

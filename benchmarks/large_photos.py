"""Large photos (50–200 megapixels): full vs DCT-reduced JPEG decoding, the end-to-end pipeline, peak memory.

    python benchmarks/run.py large-photos [--megapixels 54,108] [--repeats 3]

For each size, the group photo ``$FACEKIT_DATA/photos/group_t1.jpg`` (6 faces) is scaled up and written
as a baseline JPEG (OpenCV, quality 90, 4:2:0) with sensor-like grain, so that its bits per pixel are
near a phone photo's. Measured, in one run on one machine:

* decoding: OpenCV's full decode and its ``IMREAD_REDUCED_COLOR_2/4/8`` (libjpeg DCT scaling), and
  ``runtime.image_io.load_image_scaled`` (Pillow header probe + the reduction it picks for the default
  ``max_pixels``); the header probe alone; a forged header (a decompression bomb) being refused;
* the pipeline: ``FacePipeline.embed(path)`` (detect → landmarks → warp → embed), faces found, and the
  process's peak RSS, each in a fresh subprocess: facekit's default (reduced decode) against a
  full-resolution decode (``max_pixels=None``).

Writes ``benchmarks/results/<date>-<machine>-large-photos.{md,json}``. Run timing benchmarks under
``flock /tmp/facekit-bench.lock``. The generated photos live in a temporary folder and are deleted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks import report as rp
from benchmarks.child_process import child_env
from evaluation.data import PROJECT_ROOT as ROOT, data_root
from runtime.field_options import add_list_option
from runtime.files import atomic_write_bytes

SOURCE_PHOTO = Path("photos") / "group_t1.jpg"
SOURCE_FACES = 6
DEFAULT_MEGAPIXELS = (54.0, 108.0)
#: Uniform grain amplitude (± levels) added to the upscaled photo; 0 gives a smooth, much smaller file.
DEFAULT_GRAIN = 6


def make_large_jpeg(photo: str | os.PathLike, megapixels: float, out: str | os.PathLike, grain: int = 0,
                    quality: int = 90) -> tuple[int, int]:
    """Write ``photo`` scaled up (bilinear) to about ``megapixels`` as a baseline JPEG at ``out``.

    ``grain`` adds uniform noise of ± that many levels (sensor-like texture: realistic file size and
    decode time). Returns the (width, height) written.
    """
    src = cv2.imread(os.fspath(photo), cv2.IMREAD_COLOR)
    if src is None:
        raise FileNotFoundError(f"{photo}: cannot read the source photo")
    factor = math.sqrt(megapixels * 1e6 / (src.shape[0] * src.shape[1]))
    size = (round(src.shape[1] * factor), round(src.shape[0] * factor))
    big = cv2.resize(src, size, interpolation=cv2.INTER_LINEAR)
    del src
    if grain:
        noise = np.empty_like(big)
        cv2.randu(noise, (0, 0, 0), (256, 256, 256))
        cv2.addWeighted(big, 1.0, noise, grain / 127.5, -float(grain), dst=big)  # saturating, in place
        del noise
    ok, buf = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode the large JPEG")
    del big
    atomic_write_bytes(out, buf.tobytes())
    return size


def forged_jpeg_header(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims ``width`` × ``height`` (a decompression bomb)."""
    jpg = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
    sof = jpg.index(b"\xff\xc0")
    return jpg[:sof + 5] + struct.pack(">HH", height, width) + jpg[sof + 9:]


# ------------------------------------------------------------------------------------------ measuring


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn()`` (CPU time, all threads, is less disturbed by a busy machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure_decoding(path: Path, repeats: int) -> dict:
    """Median decode times (ms): OpenCV full and reduced, facekit's probe and its load; image sizes."""
    from runtime.image_io import load_image_scaled, probe, read_file

    data = read_file(path, max_bytes=None)
    buf = np.frombuffer(data, np.uint8)
    rows = []
    for label, flags in (("full", cv2.IMREAD_COLOR), ("1/2", cv2.IMREAD_REDUCED_COLOR_2),
                         ("1/4", cv2.IMREAD_REDUCED_COLOR_4), ("1/8", cv2.IMREAD_REDUCED_COLOR_8)):
        shape = cv2.imdecode(buf, flags).shape
        wall, cpu = _median_seconds(lambda: cv2.imdecode(buf, flags), repeats)
        rows.append({"decode": f"OpenCV {label}", "ms": round(wall * 1e3, 1), "cpu_ms": round(cpu * 1e3, 1),
                     "width": shape[1], "height": shape[0]})
    loaded = load_image_scaled(path)
    wall, cpu = _median_seconds(lambda: load_image_scaled(path), repeats)
    rows.append({"decode": f"load_image_scaled (picks 1/{round(1 / loaded.scale)})", "ms": round(wall * 1e3, 1),
                 "cpu_ms": round(cpu * 1e3, 1), "width": loaded.image.shape[1], "height": loaded.image.shape[0]})
    probe_s = _median_seconds(lambda: probe(data, max_pixels=None), max(repeats, 20))[0]
    return {"rows": rows, "probe_us": round(probe_s * 1e6, 1), "scale": loaded.scale, "bytes": len(data)}


# Peak RSS is the child's VmHWM: ru_maxrss would carry over the parent's peak through fork/vfork + exec.
_PIPELINE_CHILD = r"""
import json, statistics, sys, time
from benchmarks.memory import status_mib
from runtime import FacePipeline
from runtime.image_io import load_image_scaled
path, warmup, repeats, full = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "full"
pipe = FacePipeline()
pipe.embed(warmup)  # models loaded and warm before timing
times, cpu, faces = [], [], []
for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    faces = pipe.embed(load_image_scaled(path, max_pixels=None) if full else path)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
print(json.dumps({"ms": round(statistics.median(times) * 1e3, 1), "cpu_ms": round(statistics.median(cpu) * 1e3, 1),
                  "faces": len(faces),
                  "boxes": [[round(float(v), 1) for v in f.box] for f in faces],
                  "peak_rss_mib": round(status_mib("VmHWM"), 1)}))
"""


def measure_pipeline(path: Path, warmup: Path, repeats: int, full: bool) -> dict:
    """``FacePipeline.embed`` in a fresh subprocess: median ms, faces, boxes, peak RSS (MiB)."""
    env = child_env()
    r = subprocess.run([sys.executable, "-c", _PIPELINE_CHILD, str(path), str(warmup), str(repeats),
                        "full" if full else "reduced"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"pipeline subprocess failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_bomb(repeats: int) -> dict:
    """Time to refuse a JPEG whose header claims 20000 × 20000 (fits at 1/4 scale) over 1 KB of data."""
    from runtime.image_io import ImageError, decode_image

    data = forged_jpeg_header(20000, 20000)

    def refuse():
        try:
            decode_image(data)
        except ImageError as e:
            return e.reason
        raise AssertionError("the forged header was not refused")

    reason = refuse()
    return {"bytes": len(data), "us": round(_median_seconds(refuse, max(repeats, 20))[0] * 1e6, 1), "reason": reason}


# -------------------------------------------------------------------------------------------- report


def run(args) -> dict:
    """The ``large-photos`` subcommand: measure, print the markdown, write the report files."""
    photo = data_root() / SOURCE_PHOTO
    if not photo.is_file():
        raise FileNotFoundError(f"{photo}: the source photo is missing (set $FACEKIT_DATA)")
    info = rp.machine_info()
    result = {"machine": info, "source": str(SOURCE_PHOTO), "grain": args.grain, "repeats": args.repeats,
              "photos": [], "bomb": measure_bomb(args.repeats)}
    with tempfile.TemporaryDirectory(prefix="facekit-large-") as tmp:
        original = measure_pipeline(photo, photo, args.repeats, full=False)
        result["original"] = {"faces": original["faces"], "ms": original["ms"], "peak_rss_mib": original["peak_rss_mib"]}
        for mp in args.megapixels:
            path = Path(tmp) / f"group_{mp:g}mp.jpg"
            width, height = make_large_jpeg(photo, mp, path, grain=args.grain)
            print(f"large-photos: {mp:g} MP ({width}×{height})", file=sys.stderr, flush=True)
            entry = {"megapixels": round(width * height / 1e6, 1), "width": width, "height": height,
                     "decoding": measure_decoding(path, args.repeats),
                     "pipeline_reduced": measure_pipeline(path, photo, args.repeats, full=False),
                     "pipeline_full": measure_pipeline(path, photo, args.repeats, full=True)}
            entry["bits_per_pixel"] = round(entry["decoding"]["bytes"] * 8 / (width * height), 2)
            result["photos"].append(entry)
            path.unlink()
    result["load_average_at_end"] = rp.load_average()
    text = to_markdown(result)
    print(text)
    if (out_dir := rp.results_dir(args)) is not None:
        stem = f"{rp.report_stem(info)}-large-photos"
        rp.write_md_and_json(out_dir / stem, text, result)
        print(f"written: {out_dir / stem}.md, .json", file=sys.stderr)
    return result


def to_markdown(r: dict) -> str:
    """The report: one decoding table and one pipeline table per photo size, and the bomb refusal."""
    lines = ["# Large photos: reduced JPEG decoding", "",
             f"Machine: {rp.machine_line(r['machine'])}; load average at start "
             f"{r['machine'].get('load_average_at_start')}, at the end {r.get('load_average_at_end')}. "
             f"Medians of {r['repeats']} runs; CPU time is the process's, all threads (less disturbed than wall "
             "time by other processes on a shared machine).", "",
             f"Source: `$FACEKIT_DATA/{r['source']}` ({SOURCE_FACES} faces), scaled up bilinearly, grain "
             f"±{r['grain']} levels, baseline JPEG quality 90 (OpenCV, 4:2:0). On the original photo the "
             f"pipeline finds {r['original']['faces']} faces in {r['original']['ms']} ms.", ""]
    for p in r["photos"]:
        d = p["decoding"]
        full = d["rows"][0]
        lines += [f"## {p['megapixels']} MP ({p['width']}×{p['height']}, {d['bytes'] / 1e6:.1f} MB, "
                  f"{p['bits_per_pixel']} bits/pixel)", "",
                  rp.table(["decode", "wall ms", "CPU ms", "full / this (CPU)", "decoded size"],
                           [[row["decode"], f"{row['ms']:.1f}", f"{row['cpu_ms']:.1f}",
                             f"{full['cpu_ms'] / row['cpu_ms']:.1f}×", f"{row['width']}×{row['height']}"]
                            for row in d["rows"]]), "",
                  f"Header probe (Pillow, no decoding): {d['probe_us']} µs.", ""]
        rows = []
        for label, key in (("facekit default (reduced decode)", "pipeline_reduced"),
                           ("full-resolution decode (max_pixels=None)", "pipeline_full")):
            m = p[key]
            rows.append([label, f"{m['ms']:.0f}", f"{m['cpu_ms']:.0f}", str(m["faces"]), f"{m['peak_rss_mib']:.0f}"])
        lines += [rp.table(["FacePipeline.embed(path)", "wall ms", "CPU ms (all threads)", "faces",
                            "peak RSS MiB (process)"], rows), ""]
    b = r["bomb"]
    lines += ["## Decompression bomb", "",
              f"A {b['bytes']}-byte JPEG whose header claims 20000×20000 (it would fit the 50 MP limit at 1/4 "
              f"scale) is refused in {b['us']} µs: \"{b['reason']}\".", ""]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """The subcommand's options (registered by ``benchmarks/run.py``)."""
    add_list_option(parser, "--megapixels", DEFAULT_MEGAPIXELS, "photo sizes to generate", minimum=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--grain", type=int, default=DEFAULT_GRAIN,
                        help="± levels of uniform grain added to the upscaled photo (0: smooth)")
    # also accepted after the subcommand; SUPPRESS keeps a value given before it
    parser.add_argument("--results", default=argparse.SUPPRESS, help="report folder (default benchmarks/results)")
    parser.add_argument("--no-write", action="store_true", default=argparse.SUPPRESS,
                        help="print the report but write no files")

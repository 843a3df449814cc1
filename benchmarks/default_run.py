"""The default run of ``python benchmarks/run.py``: the shipped models on every backend here, LFW / CFP-FP
accuracy, identification, landmark sources side by side, parity and latency, written as one report."""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import report as rp
from benchmarks.commands import pipeline_timing, run_parity
from benchmarks.harness import crops_for, log, make_aligner, make_embedder, resolve_model, verify
from benchmarks.parity import plan_backends
from evaluation import crops as ec
from evaluation import pairs as ep
from evaluation.data import data_root
from runtime.messages import first_line

REPORT_NOTES = (
    "Accuracy: insightface protocol (image + flip embeddings summed, L2-normalised; squared-L2 thresholds "
    "0..4 step 0.01; 10 contiguous folds; threshold picked on 9 folds, accuracy on the 10th; mean ± std).",
    "TAR@FAR: pooled over all pairs (not cross-validated); the smallest measurable FAR is 1 / (different "
    "pairs): with LFW's 3000 different pairs, FAR 1e-4 allows no false accept at all.",
    "threshold (cos): the grid threshold with the best accuracy on all pairs, as a cosine (1 − d²/2); "
    "the value to use with FacePipeline.compare.",
    "Fallback crops: images with no face at detector score 0.5 are retried at 0.05 (low_threshold); if still "
    "none, the data set's median landmark placement is used (centre_fallback). Every pair is scored.",
    "Parity: the same aligned crops (and their flips) through every backend; cosine of each backend's raw "
    "embedding with the reference's, per crop.",
)


class Clock:
    """Wall and CPU (all threads of this process) seconds per stage."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._t0 = (time.perf_counter(), time.process_time())
        self._t = self._t0

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        wall, cpu = time.perf_counter() - self._t[0], time.process_time() - self._t[1]
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}

    def total(self) -> None:
        self._t = self._t0
        self.stop("total")


class DefaultRun:
    """The default run's stages on one report (each stage timed by :class:`Clock`)."""

    def __init__(self, args):
        self.args = args
        self.clock = Clock()
        self.model = resolve_model(args.model)
        self.info = rp.machine_info()
        date = _dt.date.today().isoformat()
        self.results_dir = Path(args.results) if args.results else rp.RESULTS_DIR
        self.plots_dir = None if args.no_write else self.results_dir / rp.report_stem(self.info, date)
        self.report: dict = {"date": date, "machine": self.info, "models": {}, "verification": {}, "plots": {},
                             "command": rp.run_command(), "notes": list(REPORT_NOTES)}
        log(f"machine: {rp.machine_line(self.info)}")
        self.main = make_embedder(self.model, "onnxruntime", "cpu")
        meta = self.main.metadata
        self.report["models"]["recognizer"] = (f"{rp.shown_path(self.model)} (arch {meta.get('arch', '?')}, embedding "
                                               f"{meta.get('embedding_size', '?')}, {self.main.precision}, "
                                               f"threshold_cosine {meta.get('threshold_cosine', '–')})")
        self.clock.start()
        self.plans = plan_backends(self.model, args.checkpoint)
        self.clock.stop("plan backends")
        self.data = data_root()
        self.aligner = None
        self.lfw_set = self.lfw_crops = None
        self.curves: dict = {}
        self.seen: dict = {}  # image path -> fused embedding with args.landmarks' points (reused by landmark sources)

    def verification(self, name: str, pairset: ep.PairSet, save_as: str) -> tuple[ec.CropSet, np.ndarray]:
        """Crops, embeddings and accuracy of one pair set; returns (crops, fused embeddings)."""
        if self.aligner is None:
            self.aligner = make_aligner(self.args)
            d = self.aligner.description
            self.report["models"]["alignment"] = (f"detector {d['detector']}, landmarks from the {d['landmarks']}"
                                                  + (f" ({d['aligner']})" if d.get("aligner") else "")
                                                  + "; crops cached in " + str(ec.cache_dir()))
        self.clock.start()
        crops = crops_for(pairset, self.args, self.main.spec, self.aligner)
        self.clock.stop(f"{name} detect+align" + (" (cache)" if crops.from_cache else ""))
        self.clock.start()
        res_dict, fused, res = verify(pairset, crops, self.main, self.args, self.plots_dir,
                                      _save_name(self.args.save_embeddings, save_as))
        self.clock.stop(f"{name} embed+evaluate (onnxruntime-cpu fp32)")
        self.curves[f"{name} (acc {100 * res.accuracy:.2f} %, AUC {res.roc_auc:.4f})"] = res.roc
        self.report["verification"][name] = res_dict
        self.report["plots"].update(res_dict.pop("plots", {}))
        self.seen.update(zip(map(str, pairset.images), fused))
        return crops, fused

    def lfw(self) -> None:
        """LFW accuracy, then identification and a t-SNE map of its embeddings."""
        from benchmarks import plots
        from evaluation.identification import evaluate_identification

        self.lfw_set = self._pair_set("LFW")
        if self.lfw_set is None:
            return
        self.lfw_crops, fused = self.verification("LFW", self.lfw_set, "lfw")
        self.clock.start()
        ident = evaluate_identification(fused, self.lfw_set.identities, min_images=self.args.min_images)
        self.report["identification"] = {**ident.to_dict(), "data": "LFW (pairs.txt images)", "backend": self.main.name}
        if self.plots_dir is not None:
            self.report["plots"]["identification TPR@FPR"] = plots.tpr_at_fpr_curve(
                ident.curve, self.plots_dir / "identification-tpr-fpr.png", ident.tpr_at_fpr,
                title="LFW identification: TPR at FPR")
            self.report["plots"]["t-SNE (LFW)"] = plots.tsne_map(
                fused, self.lfw_set.identities, self.plots_dir / "lfw-tsne.png", title="t-SNE of LFW embeddings")
        self.clock.stop("identification + t-SNE")

    def cfp_fp(self) -> None:
        cfp = self._pair_set("CFP-FP")
        if cfp is not None:
            self.verification("CFP-FP", cfp, "cfp-fp")

    def _pair_set(self, name: str) -> ep.PairSet | None:
        """The standard pair set ``name`` under the data root, or None with a note saying what is missing."""
        found, missing = ep.standard_pair_sets(self.data, [name])
        if name in missing:
            self.report["notes"].append(ep.missing_set_note(name, missing[name]))
        return found.get(name)

    def landmark_sources(self) -> None:
        from benchmarks import landmark_sources

        a = self.args
        self.clock.start()
        self.report["landmark_sources"] = landmark_sources.compare_landmark_sources(
            self.data, self.main, {a.landmarks: self.seen}, getattr(a, "detector", None), a.aligner,
            not a.no_cache, not a.quiet, log)
        self.clock.stop("landmark sources (LFW, CFP-FP, CFP-FF; detector and aligner points)")

    def parity(self) -> None:
        """Every backend on the same LFW subset (or generated crops without data)."""
        a = self.args
        self.clock.start()
        if self.lfw_set is not None:
            keep = ep.subset_pairs(self.lfw_set.pairs, self.lfw_set.issame, a.pairs_per_fold)
            sub = ep.restrict(self.lfw_set, keep)
            used = np.unique(self.lfw_set.pairs[keep])
            sub_crops = ec.CropSet(self.lfw_crops.crops[used], self.lfw_crops.how[used])
            rows = run_parity(self.model, a.checkpoint, sub, sub_crops, a, self.plans)
            data = (f"LFW subset: first {a.pairs_per_fold} same + {a.pairs_per_fold} different pairs of each fold "
                    f"({len(sub)} pairs, {len(sub.images)} images, {2 * len(sub.images)} crops incl. flips)")
        else:
            rng = np.random.default_rng(0)
            fake = ec.CropSet(rng.integers(0, 256, (256, *self.main.spec.input_size, 3), dtype=np.uint8),
                              np.zeros(256, np.int8))
            rows = run_parity(self.model, a.checkpoint, None, fake, a, self.plans)
            data = "256 random crops (no LFW data: cosines only)"
        self.report["parity"] = {"data": data, "rows": rows,
                                 "reference": next((r["reference"] for r in rows if "reference" in r), "")}
        self.clock.stop("parity (all backends)")

    def latency(self) -> None:
        """Recognizer latency of every backend that loads here, then the end-to-end pipeline."""
        from benchmarks import latency

        self.clock.start()
        rows = []
        for plan in self.plans:
            if plan.skip_reason:
                continue
            try:
                emb = plan.build()
            except Exception as e:
                self.report["notes"].append(f"latency: {plan.label} failed to load: {first_line(e)}")
                continue
            log(f"latency: {emb.name}")
            rows += [r.to_dict() for r in latency.recognizer_latency(emb, budget_s=self.args.seconds)]
        self.report["latency"] = rows
        self.clock.stop("recognizer latency")
        self.clock.start()
        self.report["pipeline"] = pipeline_timing(self.model, self.args)
        self.clock.stop("pipeline latency")

    def finish(self) -> dict:
        """Timings, the ROC plot, the report files; prints the report (markdown, or JSON with --json)."""
        from benchmarks import plots

        if self.curves and self.plots_dir is not None:
            self.report["plots"]["ROC"] = plots.roc_curves(self.curves, self.plots_dir / "roc.png",
                                                           title="verification ROC")
        self.clock.total()
        self.info["load_average_at_end"] = rp.load_average()
        self.report["timings"] = self.clock.stages
        self.report["plots"] = {k: os.path.relpath(v, self.results_dir) for k, v in self.report["plots"].items() if v}
        if not self.args.no_write:
            md, js = rp.write_report(self.report, self.results_dir)
            log(f"wrote {md} and {js}")
        if self.args.json:
            print(json.dumps(self.report, default=rp._json_default))
        else:
            print(rp.to_markdown(self.report))
        return self.report


def cmd_default(args) -> dict:
    """Shipped models, every backend here, parity, latency, LFW / CFP-FP accuracy, landmark sources; writes
    the report files."""
    run = DefaultRun(args)
    run.lfw()
    run.cfp_fp()
    run.landmark_sources()
    run.parity()
    run.latency()
    return run.finish()


def _save_name(base: str | None, name: str) -> str | None:
    if not base:
        return None
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix or '.npz'}"))


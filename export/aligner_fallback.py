"""Measure an exported aligner's fallback rule on its training faces and store it in the model's metadata.

    python export/aligner_fallback.py runtime/models/aligner.onnx \\
        --data $FACEKIT_DATA/landmarks_300w/train --data $FACEKIT_DATA/landmarks_300w/afw

The rule (:class:`runtime.landmarks.FallbackRule`) tells the runtime when to return the detector's points
instead of the aligner's: where the aligner's weakest heatmap peak is lower, or its points lie further
from the detector's, than on ``--coverage`` of the faces it was trained on (profiles, faces unlike its
training data). The default detector finds each annotated face (as at run time) and the aligner refines
it; the rule and the data it was measured on go into the model's facekit metadata (``fallback``,
``fallback_measured_on``), the weights stay as they are. ``python train/aligner.py`` measures the same rule
at the end of training, and ``export/to_onnx.py --checkpoint`` carries it; this tool is for models exported
without one, or to measure it again.
"""
from __future__ import annotations

import sys
from pathlib import Path


def measure_and_store(model: Path, data: list[Path], coverage: float, out: Path, progress: bool = True) -> dict:
    """Measure the rule of ``model`` on ``data`` and write the model with it to ``out``; returns the rule."""
    from evaluation.landmarks import aligner_agreement, fallback_rule
    from export.onnx_utils import read_metadata, save_onnx, set_metadata
    from runtime.landmarks import LandmarkRefiner

    import onnx

    refiner = LandmarkRefiner(str(model), fallback=False)
    det, ali, peaks = aligner_agreement(data, refiner, progress=progress)
    rule = fallback_rule(det, ali, peaks, coverage).to_dict()
    proto = onnx.load(str(model))
    meta = read_metadata(proto)
    meta["fallback"] = rule
    meta["fallback_measured_on"] = {"data": [p.name for p in data], "faces": int(len(det)), "coverage": coverage}
    set_metadata(proto, meta)
    save_onnx(proto, out)
    return {**rule, "faces": int(len(det))}


def main(argv: list[str] | None = None) -> int:
    from export.cli import doc_parser

    p = doc_parser(__doc__)
    p.add_argument("model", type=Path, help="aligner ONNX file")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="landmark folder the aligner was trained on (images + .pts5); repeatable")
    p.add_argument("--coverage", type=float, default=0.99,
                   help="fraction of those faces on which each criterion keeps the aligner (default 0.99)")
    p.add_argument("--out", type=Path, help="output file (default: rewrite MODEL)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        rule = measure_and_store(a.model, a.data, a.coverage, a.out or a.model, progress=not a.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"fallback rule: min_peak {rule['min_peak']}, max_disagreement {rule['max_disagreement']} "
          f"(measured on {rule['faces']} faces); wrote {a.out or a.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""facekit evaluation: the torch-free protocols and metrics that training, export and the benchmarks share.

- :mod:`evaluation.pairs` — verification pair sets (LFW, CFP-FP / CFP-FF, insightface ``.bin``).
- :mod:`evaluation.bin_format` — the safe reader of insightface ``.bin`` pickles.
- :mod:`evaluation.crops` — aligned crops of a pair set's images, through the runtime's subject path.
- :mod:`evaluation.verification` — insightface's 10-fold verification protocol, TAR@FAR, ROC.
- :mod:`evaluation.identification` — TPR at FPR against distractors.
- :mod:`evaluation.data` — where the research data lives (``$FACEKIT_DATA``).

Imports only :mod:`runtime` (and numpy, OpenCV, scikit-learn); never torch.
"""

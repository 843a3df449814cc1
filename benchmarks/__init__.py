"""facekit benchmarks: verification (insightface 10-fold protocol), identification, latency and backend parity.

Run ``python benchmarks/run.py --help``. Modules:

- :mod:`benchmarks.verification` — flip-summed embeddings, 10-fold accuracy, TAR@FAR, ROC AUC.
- :mod:`benchmarks.datasets` — LFW, CFP-FP/FF and insightface ``.bin`` pair sets; aligned-crop cache.
- :mod:`benchmarks.identification` — TPR at fixed FPR against a distractor set.
- :mod:`benchmarks.parity` — embedders for every backend and their agreement with PyTorch fp32.
- :mod:`benchmarks.latency` — p50/p95 latency, throughput and end-to-end photos/s.
- :mod:`benchmarks.large_photos` — 50–200 MP JPEGs: full vs reduced decoding, pipeline time, peak RSS.
- :mod:`benchmarks.triton` — throughput and p50/p99 latency through a Triton server vs in-process.
- :mod:`benchmarks.plots` — ROC, cosine histograms, TPR@FPR curve, t-SNE (PNG, Agg backend).
- :mod:`benchmarks.report` — markdown / JSON report files named after the machine.
"""

"""facekit benchmarks: verification (insightface 10-fold protocol), identification, latency and backend parity.

Run ``python benchmarks/run.py --help``. Modules:

Pair sets, aligned crops, verification and identification metrics live in the torch-free
:mod:`evaluation` package; the modules here measure with them:

- :mod:`benchmarks.parity` — embedders for every backend and their agreement with PyTorch fp32.
- :mod:`benchmarks.latency` — p50/p95 latency, throughput and end-to-end photos/s.
- :mod:`benchmarks.large_photos` — 50–200 MP JPEGs: full vs reduced decoding, pipeline time, peak RSS.
- :mod:`benchmarks.cpu_backends` — OpenVINO f32 / bf16 / int8 against ONNX Runtime fp32; pipeline ratios.
- :mod:`benchmarks.triton` — throughput and p50/p99 latency through a Triton server vs in-process.
- :mod:`benchmarks.plots` — ROC, cosine histograms, TPR@FPR curve, t-SNE (PNG, Agg backend).
- :mod:`benchmarks.report` — markdown / JSON report files named after the machine.
"""

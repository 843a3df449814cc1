"""facekit export: PyTorch → ONNX (fp32, fp16, INT8 Q/DQ) → TensorRT, each step checked against its source.

Command lines: ``python export/to_onnx.py``, ``python export/to_trt.py`` and ``python export/to_triton.py``.
Modules:

- :mod:`export.onnx_export` — model sources (``--arch`` / ``--checkpoint``), the ONNX export itself, metadata;
- :mod:`export.onnx_utils` — torch-free helpers: metadata in/out, precision detection, hashing, atomic writes;
- :mod:`export.parity` — parity inputs (real aligned faces when available) and ONNX Runtime vs PyTorch checks;
- :mod:`export.fp16` — fp16 graphs with fp32 inputs/outputs;
- :mod:`export.calibration` — folders of aligned crops, the INT8 calibration reader;
- :mod:`export.quantize` — INT8 Q/DQ quantization and its accuracy guard;
- :mod:`export.cli` — what the command lines share: the parser built from a tool's docstring;
- :mod:`export.trt_build` — ONNX → TensorRT engine with a JSON sidecar and an engine cache;
- :mod:`export.triton_repository` — a Triton model repository (configs derived from the models), written by
  ``python export/to_triton.py``; :mod:`export.triton_python_model` — its Python-backend ``model.py``
  (``face_pipeline``, ONNX on facekit's runtime); :mod:`export.triton_server` — a local ``tritonserver``.

Importing this package imports nothing heavy; each module pulls in torch / onnx / tensorrt itself.
"""

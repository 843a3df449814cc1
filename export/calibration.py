"""Folders of aligned face crops, and the INT8 calibration reader that feeds them to ONNX Runtime.

Crops must already be aligned to the model's input size (e.g. 112×112 from ``train/make_aligned.py``); they
go through :func:`runtime.preprocess.to_model_input`, exactly as in training and serving.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.files import existing_folder
from runtime.photo_lists import IMAGE_EXTENSIONS, is_image_file
from runtime.preprocess import PreprocessSpec, to_model_input


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); at most ``limit``, spread evenly over the list."""
    root = existing_folder(folder, what="a folder of aligned face crops")
    files = sorted(p for p in root.rglob("*") if is_image_file(p.name) and p.is_file())
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if limit is not None and len(files) > limit:
        idx = np.linspace(0, len(files) - 1, int(limit)).round().astype(int)
        files = [files[i] for i in idx]
    return files


def load_crops(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Read aligned crops (BGR uint8, N×H×W×3); every one must be ``size`` (h, w) already."""
    from runtime.image_io import load_image

    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        img = load_image(str(p), color_order="BGR")
        if img.shape[:2] != tuple(size):
            raise ValueError(
                f"{p}: crop is {img.shape[1]}×{img.shape[0]}, the model expects aligned {size[1]}×{size[0]} crops "
                "(make them with train/make_aligned.py)"
            )
        out[i] = img
    return out


def load_crop_folder(folder: str | os.PathLike, size: tuple[int, int], limit: int | None = None) -> np.ndarray:
    """:func:`list_images` then :func:`load_crops`."""
    return load_crops(list_images(folder, limit), size)


def batches(crops: np.ndarray, spec: PreprocessSpec, batch_size: int, color_order: str = "BGR") -> Iterator[np.ndarray]:
    """Model-input tensors for ``crops`` in batches of ``batch_size``."""
    for i in range(0, len(crops), batch_size):
        yield to_model_input(crops[i:i + batch_size], spec, color_order=color_order)


def make_calibration_reader(crops: np.ndarray, spec: PreprocessSpec, input_name: str, batch_size: int = 8,
                            color_order: str = "BGR"):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over aligned crops."""
    from onnxruntime.quantization import CalibrationDataReader

    class CropCalibrationReader(CalibrationDataReader):
        """Feeds preprocessed batches of aligned crops to the calibrator; rewindable."""

        def __init__(self) -> None:
            self.count = len(crops)
            self._it: Iterator[np.ndarray] | None = None
            self.rewind()

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = batches(crops, spec, batch_size, color_order)

        def __len__(self) -> int:
            return -(-len(crops) // batch_size)

    if len(crops) == 0:
        raise ValueError("calibration needs at least one aligned crop")
    return CropCalibrationReader()

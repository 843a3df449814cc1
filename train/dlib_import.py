"""Read dlib's face-recognition ResNet weights into :class:`train.backbones.dlib_resnet.DlibResNet`.

``dlib_face_recognition_resnet_model_v1.dat`` (public domain, from the ``face_recognition_models`` package) is
dlib's own serialisation of the network: layers bottom-up, each a version string and its fields (integers in
dlib's variable-length form, doubles as mantissa/exponent, tensors as four dimensions and raw little-endian
float32). Only the layers with weights are read (``con_4`` + ``affine_`` pairs, then ``fc_2``); dlib itself is
not needed. The affine layers are folded into the convolutions and dlib's input scaling into the first one.
An optional ``centre`` becomes the last layer's bias (``--centre-on``: the mean output over some photos; it
lowered LFW accuracy, see runtime/models/recognizer.md, so the default output is dlib's raw descriptor).

    python -m train.dlib_import --out work_data/dlib_resnet.pt          # then export/to_onnx.py --checkpoint
    python -m train.dlib_import --measure-template $FACEKIT_DATA/celeba --limit 300   # needs dlib
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.preprocess import DLIB_CHIP_SPEC

from .backbones.dlib_resnet import INPUT_SIZE, DlibResNet
from .dlib_models import DLIB_EMBEDDER, dlib_model_file

#: dlib's ``input_rgb_image`` mean per channel (R, G, B); it divides by 256 after subtracting it.
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_SCALE = 256.0
_LAYER = re.compile(rb"\x01\x05con_4|\x01\x07affine_|\x01\x04fc_2")


class DlibFormatError(ValueError):
    """The file is not the dlib face-recognition ResNet this importer knows."""


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def int(self) -> int:
        head = self.data[self.pos]
        n = head & 0x0F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + n], "little")
        self.pos += 1 + n
        return -value if head & 0x80 else value

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise DlibFormatError(f"unexpected tensor version at byte {self.pos}")
        shape = [self.int() for _ in range(4)]
        n = int(np.prod(shape))
        out = np.frombuffer(self.data, "<f4", n, self.pos).astype(np.float32)
        self.pos += 4 * n
        return out

    def alias(self) -> tuple[int, ...]:
        if self.int() != 1:
            raise DlibFormatError(f"unexpected alias-tensor version at byte {self.pos}")
        return tuple(self.int() for _ in range(4))


def read_layers(path: str | Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The weighted layers of a dlib network file, bottom-up: ``("con", {"w", "b"})``,
    ``("affine", {"gamma", "beta"})`` and ``("fc", {"w"})`` (``w`` as out × in for fc)."""
    data = Path(path).read_bytes()
    try:
        return _read_layers(data)
    except (IndexError, ValueError) as e:  # truncated: a tensor or an integer runs past the end
        raise DlibFormatError(f"{path}: not a complete dlib network file ({e})") from None


def _read_layers(data: bytes) -> list[tuple[str, dict[str, np.ndarray]]]:
    layers, end = [], 0
    for m in _LAYER.finditer(data):
        if m.start() < end:  # bytes inside the previous layer's tensor that happen to spell a tag
            continue
        r, tag = _Reader(data, m.end()), m.group()[2:]
        if tag == b"con_4":
            params = r.tensor()
            [r.int() for _ in range(7)]  # filters, rows, cols (the shape alias says them again), strides, paddings
            shape, bias = r.alias(), r.alias()
            size = int(np.prod(shape))
            layers.append(("con", {"w": params[:size].reshape(shape), "b": params[size:size + bias[1]]}))
        elif tag == b"affine_":
            params = r.tensor()
            gamma, beta = r.alias(), r.alias()
            r.int()  # mode
            layers.append(("affine", {"gamma": params[:gamma[1]], "beta": params[gamma[1]:gamma[1] + beta[1]]}))
        else:
            outputs, inputs = r.int(), r.int()
            params = r.tensor()
            layers.append(("fc", {"w": params[:inputs * outputs].reshape(inputs, outputs).T.copy()}))
        end = r.pos
    return layers


def dlib_state_dict(path: str | Path, centre: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """A :class:`DlibResNet` state dict from dlib's file (see :func:`state_dict_from_layers`)."""
    return state_dict_from_layers(read_layers(path), centre, source=str(path))


def state_dict_from_layers(layers: list[tuple[str, dict[str, np.ndarray]]], centre: np.ndarray | None = None,
                           source: str = "dlib network") -> dict[str, torch.Tensor]:
    """A :class:`DlibResNet` state dict from :func:`read_layers` output: affines folded into the convs,
    dlib's input scaling into the stem, ``-centre`` as the fc bias when given."""
    kinds = [k for k, _ in layers]
    if kinds != ["con", "affine"] * 29 + ["fc"]:
        raise DlibFormatError(f"{source}: expected 29 conv+affine pairs and one fc, found {len(kinds)} layers "
                              f"({kinds.count('con')} conv, {kinds.count('affine')} affine, {kinds.count('fc')} fc)")
    target = DlibResNet(128).state_dict()
    conv_names = [k[:-len(".weight")] for k in target if k.endswith(".weight") and k != "fc.weight"]
    state: dict[str, torch.Tensor] = {}
    for i, name in enumerate(conv_names):
        conv, aff = layers[2 * i][1], layers[2 * i + 1][1]
        w = conv["w"] * aff["gamma"][:, None, None, None]
        b = conv["b"] * aff["gamma"] + aff["beta"]
        if i == 0:  # facekit input x = (p - 127.5) / 127.5; dlib's is (p - mean_c) / 256
            mean = np.asarray(DLIB_MEAN_RGB, np.float32)
            b = b + (w * ((127.5 - mean) / DLIB_SCALE)[None, :, None, None]).sum(axis=(1, 2, 3))
            w = w * (127.5 / DLIB_SCALE)
        if tuple(w.shape) != tuple(target[f"{name}.weight"].shape):
            raise DlibFormatError(f"{source}: layer {i} is {w.shape}, {name} expects {tuple(target[name + '.weight'].shape)}")
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.from_numpy(w), torch.from_numpy(b)
    state["fc.weight"] = torch.from_numpy(layers[-1][1]["w"])
    if centre is not None:
        state["fc.bias"] = -torch.as_tensor(np.asarray(centre, np.float32).reshape(128))
    return state


def import_dlib_resnet(path: str | Path, centre: np.ndarray | None = None) -> DlibResNet:
    """dlib's network as a :class:`DlibResNet` (eval mode), with a bias layer when ``centre`` is given."""
    model = DlibResNet(128, fc_bias=centre is not None)
    model.load_state_dict(dlib_state_dict(path, centre))
    return model.eval()


def _photos(folder: str | Path, limit: int) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{folder}: no .jpg/.png photos")
    return files[::max(1, len(files) // limit)][:limit]


def output_mean(model: DlibResNet, folder: str | Path, limit: int = 2000) -> tuple[np.ndarray, int]:
    """Mean raw output of ``model`` over the subject face of up to ``limit`` photos of ``folder``, each
    detected and warped the way the runtime does (RetinaFace → :data:`DLIB_CHIP_SPEC`); and the face count."""
    from tqdm import tqdm

    from runtime.image_io import load_image
    from runtime.pipeline import FacePipeline
    from runtime.preprocess import to_model_input

    finder, total, n = FacePipeline(preprocess=DLIB_CHIP_SPEC), np.zeros(128, np.float64), 0
    for path in tqdm(_photos(folder, limit), desc="centre", unit="photo"):
        found = finder.find_subject(load_image(str(path)))  # an array: coordinates in its own pixels
        if found.face is None:
            continue
        crop = finder.align(found.image, found.face.landmarks)
        x = torch.from_numpy(to_model_input(crop, DLIB_CHIP_SPEC, color_order="BGR"))
        with torch.inference_mode():
            total += model(x)[0].double().numpy()
        n += 1
    if n == 0:
        raise SystemExit(f"{folder}: no face found in any photo")
    return (total / n).astype(np.float32), n


def measure_chip_template(folder: str | Path, limit: int = 300) -> tuple[np.ndarray, int]:
    """Where facekit's landmarks fall on dlib's 150×150 chips: the mean RetinaFace points on the chips
    (dlib HOG detector + 5-point predictor, padding 0.25) of up to ``limit`` photos, mirrored about the
    chip's centre column (flip-consistent); and the number of chips measured. Needs dlib."""
    import cv2

    from runtime.geometry import FLIP_PAIRS
    from runtime.image_io import load_image
    from runtime.pipeline import FacePipeline
    from runtime.subject import choose_subject

    from .dlib_models import face_chip, load_dlib, rect_box

    dlib, hog, predictor, _ = load_dlib()
    finder, points = FacePipeline(preprocess=DLIB_CHIP_SPEC), []
    for path in _photos(folder, limit):
        rgb = np.ascontiguousarray(load_image(str(path))[:, :, ::-1])
        rects = hog(rgb, 1)
        if not rects:
            continue
        chip = face_chip(dlib, predictor, rgb, rects[choose_subject([rect_box(r) for r in rects], rgb.shape)[0]])
        found = finder.find_subject(cv2.resize(np.ascontiguousarray(chip[:, :, ::-1]), (300, 300)))
        if found.face is not None:  # detected at 2× (RetinaFace likes some context around a face)
            points.append(found.face.landmarks / 2.0)
    if not points:
        raise SystemExit(f"{folder}: no chip measured")
    mean = np.mean(points, axis=0)
    mirrored = mean.copy()
    mirrored[:, 0] = INPUT_SIZE - 1 - mirrored[:, 0]
    for a, b in FLIP_PAIRS:
        mirrored[[a, b]] = mirrored[[b, a]]
    return ((mean + mirrored) / 2).astype(np.float32), len(points)


def import_config(centred: bool) -> dict:
    """The checkpoint config of an imported network (task, arch, its 150×150 preprocessing)."""
    return {"name": "dlib_import", "task": "recognition", "arch": "dlib_resnet", "embedding_size": 128,
            "backbone_kwargs": {"fc_bias": bool(centred)}, "preprocess": DLIB_CHIP_SPEC.to_dict()}


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import save_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="dlib_face_recognition_resnet_model_v1.dat "
                                                 "(default: the face_recognition_models package's)")
    p.add_argument("--centre-on", type=Path, metavar="PHOTOS",
                   help="folder of photos (e.g. $FACEKIT_DATA/celeba/wild) whose mean output becomes the fc bias, "
                        "so the network outputs centred descriptors")
    p.add_argument("--limit", type=int, default=2000, help="photos used by --centre-on / --measure-template")
    p.add_argument("--out", type=Path, help="checkpoint to write (export it with export/to_onnx.py --checkpoint)")
    p.add_argument("--measure-template", type=Path, metavar="PHOTOS",
                   help="print where facekit's landmarks fall on dlib's chips of these photos (needs dlib) and exit")
    a = p.parse_args(argv)
    try:
        weights = a.weights or dlib_model_file(DLIB_EMBEDDER)
    except FileNotFoundError as e:
        p.error(str(e))
    if a.measure_template:
        template, n = measure_chip_template(a.measure_template, a.limit)
        print(f"mean RetinaFace landmarks on {n} dlib chips (150×150), mirrored:\n"
              f"{np.round(template.astype(np.float64), 2).tolist()}")
        return 0
    if a.out is None:
        p.error("--out is required")
    model = import_dlib_resnet(weights)
    centre = None
    if a.centre_on:
        centre, faces = output_mean(model, a.centre_on, a.limit)
        model = import_dlib_resnet(weights, centre)
    save_checkpoint(a.out, {"model": model.state_dict(), "config": import_config(centre is not None), "step": 0})
    n = sum(t.numel() for t in model.parameters())
    print(f"{a.out}: dlib ResNet from {weights.name}, {n:,} parameters, "
          + (f"centred on {faces} faces of {a.centre_on}" if centre is not None else "raw output"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

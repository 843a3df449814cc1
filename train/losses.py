"""Recognition losses: margin heads (ArcFace/CosFace/combined), softmax CE, focal, center, triplet, distillation.

All losses compute in float32 with autocast switched off, so they are safe under fp16/bf16 AMP.
Classification losses own their head (the class-weight matrix), so ``loss.parameters()`` must go to the
optimizer and ``loss.state_dict()`` into the checkpoint ("head"). The margin is defined once
(:class:`CombinedMargin`); :mod:`train.sharded_head` uses it for the head split over ranks. Rows labelled −1
(no identity) are masked out without host synchronisation (:func:`masked_mean`).

Config (``build_loss``), the ``loss`` section of an experiment config::

    loss:
      head: arcface          # arcface | cosface | combined | softmax | none
      s: 64.0                # scale (margin heads)
      m: 0.5                 # arcface: angular margin m2; cosface: additive margin m3
      m1: 1.0                # combined only (m1, m2, m3)
      m2: 0.5
      m3: 0.0
      easy_margin: false
      label_smoothing: 0.0
      focal_gamma: 0.0       # > 0 wraps the classification loss in a focal loss
      weight: 1.0            # weight of the classification term
      center: {weight: 0.01}                       # optional parts
      triplet: {weight: 1.0, margin: 0.3}
      distill: {weight: 1.0, mode: embedding, teacher_dim: 512}   # mode: embedding | similarity
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

#: cos θ is clamped to [-1 + COS_EPS, 1 - COS_EPS] before acos (finite gradients at θ ≈ 0 and θ ≈ π).
COS_EPS = 1e-6


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check_labels(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be N×D, got shape {tuple(emb.shape)}")
    if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be a vector of {emb.shape[0]} class ids, got shape {tuple(labels.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 (still attached to the graph) where it holds nowhere.
    No host synchronisation (no data-dependent shapes)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def focal_weighting(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample focal loss from per-sample CE ℓ: p = exp(−ℓ), (1 − p)^γ · ℓ; γ = 0 returns ℓ itself."""
    if gamma == 0:
        return ce
    p = torch.exp(-ce)
    return (1 - p).clamp(min=0) ** gamma * ce


class CombinedMargin:
    """insightface's combined margin, defined once for the full head and the sharded one: the target logit is
    s·(cos(m1·θ + m2) − m3), every other logit s·cos θ.

    ArcFace = (1, m, 0), CosFace = (1, 0, m), SphereFace-like = (m, 0, 0). Where m1·θ + m2 > π (the margin
    would wrap around) the target falls back to cos θ − m3 − (1 + cos θ₀), θ₀ = (π − m2)/m1, continuous at θ₀
    and monotone; ``easy_margin`` instead keeps cos θ wherever cos θ ≤ 0 (insightface's option).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False):
        if m1 <= 0 or s <= 0:
            raise ValueError(f"need s > 0 and m1 > 0, got s={s}, m1={m1}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.easy_margin = bool(easy_margin)
        self.theta_limit = (math.pi - self.m2) / self.m1
        self.fallback_shift = 1.0 + math.cos(self.theta_limit)

    def target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 (with the fallbacks) for target cosines ``cos_t`` (float32)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_t - self.m3
        theta = torch.acos(cos_t)
        new = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.easy_margin:
            return torch.where(cos_t > 0, new, cos_t - self.m3)
        return torch.where(theta <= self.theta_limit, new, cos_t - self.m3 - self.fallback_shift)

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scaled logits of cosines N×C; ``targets[i]`` is row i's target column, or −1 when none of these
        columns is its class (an unlabelled sample, or a class held by another rank's shard)."""
        has = (targets >= 0).view(-1, 1)
        idx = torch.where(has, targets.long().view(-1, 1), torch.zeros_like(has, dtype=torch.long))
        cos_t = cos.gather(1, idx)
        return cos.scatter(1, idx, torch.where(has, self.target(cos_t), cos_t)) * self.s


def normalized_cosine(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos θ between embeddings and class centres, float32, clamped away from ±1 (both L2-normalised)."""
    with _no_autocast(emb.device):
        cos = F.linear(F.normalize(_fp32(emb), dim=1), F.normalize(_fp32(weight), dim=1))
        return cos.clamp(-1 + COS_EPS, 1 - COS_EPS)


class CombinedMarginHead(nn.Module):
    """Class centres (num_classes×D) with a :class:`CombinedMargin` on top: ``forward(emb, labels)`` → logits.

    Rows labelled −1 get no margin (they have no class). The weight starts as N(0, 0.01²).
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0,
                 m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.margin = CombinedMargin(s, m1, m2, m3, easy_margin)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.s, self.m1, self.m2, self.m3 = self.margin.s, self.margin.m1, self.margin.m2, self.margin.m3
        self.easy_margin = self.margin.easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """cos θ between each embedding and each class centre, float32, clamped away from ±1."""
        return normalized_cosine(emb, self.weight)

    def margin_target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 (with the fallbacks) for target cosines ``cos_t`` (float32)."""
        return self.margin.target(cos_t)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled float32 logits N×num_classes; with ``labels`` the target column carries the margin."""
        with _no_autocast(emb.device):
            cos = self.cosine(emb)
            if labels is None:
                return cos * self.s
            _check_labels(emb, labels)
            return self.margin.logits(cos, labels)


class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al. 2019): s·cos(θ + m) for the target class."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__(embedding_size, num_classes, s, 1.0, m, 0.0, easy_margin)


class CosFaceHead(CombinedMarginHead):
    """CosFace (Wang et al. 2018): s·(cos θ − m) for the target class."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(embedding_size, num_classes, s, 1.0, 0.0, m)


class LinearHead(nn.Module):
    """Plain softmax classifier: a Linear layer on the (unnormalised) embedding; labels are ignored."""

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes, bias=bias)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with _no_autocast(emb.device):
            return F.linear(_fp32(emb), _fp32(self.fc.weight), None if self.fc.bias is None else _fp32(self.fc.bias))


class ClassificationLoss(nn.Module):
    """Cross-entropy (with label smoothing) on the logits of ``head``; ``gamma`` > 0 makes it focal.

    Focal form as in the course projects: per-sample CE ℓ, p = exp(−ℓ), loss = mean((1 − p)^γ · ℓ);
    γ = 0 is exactly the CE. The mean runs over the rows with a label (≥ 0); 0 when there are none.
    :class:`train.sharded_head.ShardedMarginLoss` computes the same loss with the classes split over ranks.
    """

    def __init__(self, head: nn.Module, label_smoothing: float = 0.0, gamma: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0 or gamma < 0:
            raise ValueError(f"need 0 <= label_smoothing < 1 and gamma >= 0, got {label_smoothing}, {gamma}")
        self.head, self.label_smoothing, self.gamma = head, float(label_smoothing), float(gamma)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(emb, labels)
        with _no_autocast(emb.device):
            logits = _fp32(self.head(emb, labels))
            has = labels >= 0
            ce = F.cross_entropy(logits, torch.where(has, labels, torch.zeros_like(labels)).long(), reduction="none",
                                 label_smoothing=self.label_smoothing)
            return masked_mean(focal_weighting(ce, self.gamma), has)


class FocalLoss(ClassificationLoss):
    """Focal loss (γ, default 2) wrapping the CE of any head (ArcFace, CosFace, linear)."""

    def __init__(self, head: nn.Module, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__(head, label_smoothing, gamma)


class CenterLoss(nn.Module):
    """Center loss (Wen et al. 2016): ½·mean‖x_i − c_{y_i}‖², centres are learned parameters."""

    def __init__(self, num_classes: int, embedding_size: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(emb, labels)
        with _no_autocast(emb.device):
            has = labels >= 0
            diff = _fp32(emb) - _fp32(self.centers)[torch.where(has, labels, torch.zeros_like(labels)).long()]
            return masked_mean(0.5 * diff.pow(2).sum(dim=1), has)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalised embeddings, Euclidean distance.

    For each anchor with at least one positive and one negative in the batch: relu(max d(a,p) − min d(a,n) + margin);
    the mean over those anchors. A batch without any valid anchor gives 0 (still attached to the graph).
    Rows labelled −1 are neither anchors, positives nor negatives. Use a P×K identity sampler so every batch
    has positives.
    """

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = float(margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(emb, labels)
        with _no_autocast(emb.device):
            x = F.normalize(_fp32(emb), dim=1)
            dist = (2 - 2 * x @ x.t()).clamp(min=1e-12).sqrt()
            same = labels.view(-1, 1) == labels.view(1, -1)
            has = labels >= 0
            both = has.view(-1, 1) & has.view(1, -1)
            eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
            pos, neg = same & ~eye & both, ~same & both
            valid = pos.any(1) & neg.any(1)
            hardest_pos = dist.masked_fill(~pos, 0.0).max(1).values
            hardest_neg = dist.masked_fill(~neg, 1e4).min(1).values
            return masked_mean(F.relu(hardest_pos - hardest_neg + self.margin), valid)


class DistillLoss(nn.Module):
    """Knowledge distillation from teacher embeddings (e.g. the npz ``emb`` of a bigger model).

    ``mode="embedding"``: 1 − cos(P·student, teacher), P a learned Linear(student_dim → teacher_dim) (identity
    when the sizes match and ``project`` is not forced). ``mode="similarity"``: mean squared difference of the
    batch's pairwise cosine matrices (student vs teacher); sizes may differ, no projection.
    """

    def __init__(self, student_dim: int, teacher_dim: int, mode: str = "embedding", project: bool | None = None):
        super().__init__()
        if mode not in ("embedding", "similarity"):
            raise ValueError(f"unknown distill mode {mode!r} (expected 'embedding' or 'similarity')")
        self.mode, self.student_dim, self.teacher_dim = mode, int(student_dim), int(teacher_dim)
        if project is None:
            project = mode == "embedding" and student_dim != teacher_dim
        if project and mode == "similarity":
            raise ValueError("similarity mode needs no projection")
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False) if project else nn.Identity()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student and teacher must be N×D with equal N, got {tuple(student.shape)}, {tuple(teacher.shape)}")
        if student.shape[1] != self.student_dim or teacher.shape[1] != self.teacher_dim:
            raise ValueError(f"expected student N×{self.student_dim} and teacher N×{self.teacher_dim}, "
                             f"got {tuple(student.shape)}, {tuple(teacher.shape)}")
        with _no_autocast(student.device):
            s, t = _fp32(student), _fp32(teacher).detach()
            if self.mode == "embedding":
                if isinstance(self.proj, nn.Linear):
                    s = F.linear(s, _fp32(self.proj.weight))
                return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            return (s @ s.t() - t @ t.t()).pow(2).mean()


class WeightedLoss(nn.Module):
    """Weighted sum of named loss parts; ``forward(emb, labels, teacher=None) -> (total, {name: part})``.

    Parts are called as ``part(emb, labels)``, each using only the rows with a label (label ≥ 0; unlabelled
    samples, label −1, feed only the distillation parts), except :class:`DistillLoss` parts:
    ``part(emb, teacher)`` on every row. The returned parts are detached, unweighted float32 scalars. Nothing
    here waits for the device (no host synchronisation).
    """

    def __init__(self, parts: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        if not parts:
            raise ValueError("WeightedLoss needs at least one part")
        self.parts = nn.ModuleDict({name: module for name, (_, module) in parts.items()})
        self.weights = {name: float(w) for name, (w, _) in parts.items()}

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, values = None, {}
        for name, part in self.parts.items():
            if isinstance(part, DistillLoss):
                if teacher is None:
                    raise ValueError(f"loss part {name!r} needs teacher embeddings")
                value = part(emb, teacher)
            else:
                if labels is None:
                    raise ValueError(f"loss part {name!r} needs labels")
                value = part(emb, labels)
            values[name] = value.detach()
            term = self.weights[name] * value
            total = term if total is None else total + term
        return total, values


#: Heads whose classes can be split over ranks (:mod:`train.sharded_head`).
MARGIN_HEADS = ("arcface", "cosface", "combined")


def margin_from_config(cfg: dict[str, Any]) -> CombinedMargin:
    """The :class:`CombinedMargin` of an ``arcface`` / ``cosface`` / ``combined`` loss section."""
    kind, s = str(cfg.get("head", "arcface")).lower(), float(cfg.get("s", 64.0))
    easy = bool(cfg.get("easy_margin", False))
    if kind == "arcface":
        return CombinedMargin(s, 1.0, float(cfg.get("m") if cfg.get("m") is not None else 0.5), 0.0, easy)
    if kind == "cosface":
        return CombinedMargin(s, 1.0, 0.0, float(cfg.get("m") if cfg.get("m") is not None else 0.35))
    if kind == "combined":
        return CombinedMargin(s, float(cfg.get("m1", 1.0)), float(cfg.get("m2", 0.5)), float(cfg.get("m3", 0.0)), easy)
    raise ValueError(f"loss head {kind!r} has no margin (margin heads: {', '.join(MARGIN_HEADS)})")


def _head(cfg: dict[str, Any], embedding_size: int, num_classes: int) -> nn.Module | None:
    kind = str(cfg.get("head", "arcface")).lower()
    if kind in MARGIN_HEADS:
        m = margin_from_config(cfg)
        return CombinedMarginHead(embedding_size, num_classes, m.s, m.m1, m.m2, m.m3, m.easy_margin)
    if kind in ("softmax", "linear"):
        return LinearHead(embedding_size, num_classes)
    if kind in ("none", "null"):
        return None
    raise ValueError(f"unknown loss head {kind!r} (arcface, cosface, combined, softmax, none)")


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """An optional part's settings: a mapping, or ``true`` for the defaults."""
    value = cfg.get(name)
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"loss.{name} must be a mapping (or true), got {value!r}")
    return value


def build_loss(config: dict[str, Any], num_classes: int | None = None, embedding_size: int | None = None,
               classification: Callable[[dict[str, Any], int, int], nn.Module] | None = None) -> WeightedLoss:
    """Build the :class:`WeightedLoss` an experiment config describes (see the module docstring).

    ``config`` is the whole experiment config (its ``loss`` section is used, ``embedding_size`` and
    ``num_classes`` are read from the top level unless passed) or just the loss section.
    ``classification(loss_section, embedding_size, num_classes)`` builds the classification part instead of
    :class:`ClassificationLoss` (the trainer passes :func:`train.sharded_head.sharded_builder`'s).
    """
    cfg = config.get("loss", config) if isinstance(config, dict) else config
    if isinstance(cfg, str):
        cfg = {"head": cfg}
    if not isinstance(cfg, dict):
        raise ValueError(f"loss config must be a mapping or a head name, got {cfg!r}")
    top = config if isinstance(config, dict) else {}
    embedding_size = int(embedding_size or top.get("embedding_size", 512))
    num_classes = int(num_classes or top.get("num_classes") or 0)
    kind = str(cfg.get("head", "arcface")).lower()
    parts: dict[str, tuple[float, nn.Module]] = {}

    def classes() -> int:
        if num_classes < 2:
            raise ValueError(f"loss {kind!r}/center needs num_classes >= 2 (pass num_classes=...), got {num_classes}")
        return num_classes

    if kind not in ("none", "null") and classification is not None:
        parts[kind] = (float(cfg.get("weight", 1.0)), classification(cfg, embedding_size, classes()))
    elif kind not in ("none", "null"):
        head = _head(cfg, embedding_size, classes())
        loss = ClassificationLoss(head, float(cfg.get("label_smoothing", 0.0)), float(cfg.get("focal_gamma", 0.0)))
        parts[kind] = (float(cfg.get("weight", 1.0)), loss)
    if cfg.get("center"):
        parts["center"] = (float(_section(cfg, "center").get("weight", 0.01)), CenterLoss(classes(), embedding_size))
    if cfg.get("triplet"):
        t = _section(cfg, "triplet")
        parts["triplet"] = (float(t.get("weight", 1.0)), TripletLoss(float(t.get("margin", 0.3))))
    if cfg.get("distill"):
        d = _section(cfg, "distill")
        mode = str(d.get("mode", "embedding"))
        parts["distill"] = (float(d.get("weight", 1.0)),
                            DistillLoss(embedding_size, int(d.get("teacher_dim", embedding_size)), mode))
    if not parts:
        raise ValueError("the loss config enables no part (head: none and no center/triplet/distill)")
    return WeightedLoss(parts)

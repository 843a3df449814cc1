"""A margin head whose classes are split across ranks (Partial FC, An et al. 2022, as insightface's arcface_torch).

Rank r holds the class centres ``[start_r, stop_r)`` (contiguous blocks, sizes differing by at most one) and
lives outside DDP. Each step every rank gathers the L2-normalised embeddings of the whole global batch,
computes the cosines to its own centres, puts the :class:`train.losses.CombinedMargin` on the targets it
holds, and the softmax is completed across ranks (maximum and sum of exponentials all-reduced), so every rank
obtains the same global-batch loss; label smoothing and focal weighting sit on that per-sample CE exactly as in
:class:`train.losses.ClassificationLoss`. Backward needs one collective: the gathered embeddings' gradient.
Memory per rank: its shard (and the shard's gradient and optimizer state) and a N_global × C/ranks logit
matrix instead of a full copy of the head and a full-size gradient all-reduce.

``sample_rate`` < 1 scores each step against a random subset of each shard: every class present in the
global batch plus random others, ``max(sample_rate·C_r, min(C_r, N_global))`` in all (a fixed count, so no
host synchronisation), drawn from a generator seeded by ``(seed, step, rank)``. Only those rows take part in
the step; the optimizer still sees the whole shard (as arcface_torch's Partial FC v2).

The checkpoint holds the full head (:meth:`full_rows` gathers the shards onto rank 0): a run resumes on any
number of ranks, and the full head (:class:`train.losses.CombinedMarginHead`) loads it as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import (all_gather, all_gather_with_grad, all_reduce_max, gather_rows_to_main, scale_grad,
                          sum_over_ranks)
from .losses import (COS_EPS, MARGIN_HEADS, CombinedMargin, _check_labels, _fp32, _no_autocast, focal_weighting,
                     margin_from_config, masked_mean)

#: Rows per block of the seeded initialisation (the centres do not depend on the number of ranks).
INIT_BLOCK = 4096


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of the classes rank ``rank`` holds (the first ``C % world`` ranks one more)."""
    base, extra = divmod(int(num_classes), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    return [b - a for a, b in (shard_range(num_classes, r, world_size) for r in range(world_size))]


def sample_count(shard_classes: int, sample_rate: float, global_rows: int) -> int:
    """Classes a shard of ``shard_classes`` scores against per step: all at rate 1, else
    ``max(rate·C_r, N_global)`` capped at C_r (room for every class present in the global batch)."""
    if sample_rate >= 1.0:
        return shard_classes
    return max(1, min(shard_classes, max(int(sample_rate * shard_classes), global_rows)))


def init_class_rows(start: int, stop: int, embedding_size: int, seed: int, std: float = 0.01) -> torch.Tensor:
    """Rows ``[start, stop)`` of the seeded N(0, std²) class-centre matrix (the same matrix for any split)."""
    out = torch.empty(stop - start, embedding_size)
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1 if stop > start else 0):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
        rows = torch.randn(INIT_BLOCK, embedding_size, generator=g) * std
        a, b = max(start, block * INIT_BLOCK), min(stop, (block + 1) * INIT_BLOCK)
        out[a - start:b - start] = rows[a - block * INIT_BLOCK:b - block * INIT_BLOCK]
    return out


class ClassShard(nn.Module):
    """This rank's class centres (``weight``: rows ``start..stop-1`` of the num_classes×D head)."""

    def __init__(self, embedding_size: int, num_classes: int, rank: int, world_size: int, seed: int = 0):
        super().__init__()
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.start, self.stop = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(init_class_rows(self.start, self.stop, embedding_size, seed))


class ShardedMarginLoss(nn.Module):
    """The global-batch margin softmax CE over class shards (see the module docstring).

    ``forward(emb, labels, sample_seed=0)`` takes this rank's rows; it returns the mean over every rank's
    labelled rows (the same value on every rank). Rows labelled −1 count for nothing.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: CombinedMargin, label_smoothing: float = 0.0,
                 gamma: float = 0.0, sample_rate: float = 1.0, rank: int = 0, world_size: int = 1, seed: int = 0):
        super().__init__()
        if num_classes < 2 or num_classes < world_size:
            raise ValueError(f"a sharded head needs num_classes >= max(2, ranks), got {num_classes} over {world_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"loss.sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 <= label_smoothing < 1.0 or gamma < 0:
            raise ValueError(f"need 0 <= label_smoothing < 1 and gamma >= 0, got {label_smoothing}, {gamma}")
        self.head = ClassShard(embedding_size, num_classes, rank, world_size, seed)
        self.margin, self.label_smoothing, self.gamma = margin, float(label_smoothing), float(gamma)
        self.sample_rate, self.seed = float(sample_rate), int(seed)

    @property
    def num_local(self) -> int:
        return self.head.stop - self.head.start

    def sample_count(self, global_rows: int) -> int:
        """Classes of this shard each step scores against (all of them at ``sample_rate`` 1)."""
        return sample_count(self.num_local, self.sample_rate, global_rows)

    def _sample(self, local: torch.Tensor, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centre rows, targets)``: the shard's rows this step uses and each row's target among them (−1 if none)."""
        w = self.head.weight
        k = self.sample_count(len(local))
        if k == self.num_local:
            return w, local
        g = torch.Generator(device=w.device).manual_seed(
            (self.seed * 1_000_003 + int(sample_seed)) * 4099 + self.head.rank)
        score = torch.rand(self.num_local, generator=g, device=w.device)
        has = local >= 0
        safe = torch.where(has, local, torch.zeros_like(local))
        score.scatter_reduce_(0, safe, has.to(score.dtype) * 2.0, reduce="amax")  # present classes score 2: kept
        index = score.topk(k, sorted=False).indices.sort().values
        slot = torch.full((self.num_local,), -1, dtype=torch.long, device=w.device)
        slot[index] = torch.arange(k, device=w.device)
        return w[index], torch.where(has, slot[safe], -1)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, sample_seed: int = 0) -> torch.Tensor:
        _check_labels(emb, labels)
        world = self.head.world_size
        with _no_autocast(emb.device):
            # DDP averages backbone gradients over the ranks; this loss is already the global-batch mean
            x = scale_grad(F.normalize(_fp32(emb), dim=1), world)
            x_all = all_gather_with_grad(x)
            y_all = all_gather(labels.long())
            on_shard = (y_all >= self.head.start) & (y_all < self.head.stop)
            local = torch.where(on_shard, y_all - self.head.start, -1)
            centres, targets = self._sample(local, sample_seed)
            cos = F.linear(x_all, F.normalize(_fp32(centres), dim=1)).clamp(-1 + COS_EPS, 1 - COS_EPS)
            logits = self.margin.logits(cos, targets)
            top = all_reduce_max(logits.detach().max(dim=1).values)
            log_z = top + sum_over_ranks(torch.exp(logits - top[:, None]).sum(dim=1)).log()
            hit = targets >= 0
            z_target = sum_over_ranks(torch.where(
                hit, logits.gather(1, torch.where(hit, targets, 0)[:, None])[:, 0], torch.zeros_like(log_z)))
            ce = log_z - z_target
            if self.label_smoothing > 0:
                classes = sum(self._sampled_sizes(len(y_all)))
                mean_z = sum_over_ranks(logits.sum(dim=1)) / classes
                ce = log_z - (1 - self.label_smoothing) * z_target - self.label_smoothing * mean_z
            return masked_mean(focal_weighting(ce, self.gamma), y_all >= 0)

    def _sampled_sizes(self, global_rows: int) -> list[int]:
        """Classes each rank scores against this step (known without communication)."""
        h = self.head
        return [sample_count(n, self.sample_rate, global_rows) for n in shard_sizes(h.num_classes, h.world_size)]

    # ------------------------------------------------------------------------------ full-head state
    def full_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """A tensor shaped like this rank's shard (its weight or an optimizer state of it), reassembled into
        the num_classes-row tensor on rank 0 (a CPU tensor; None on the other ranks). Every rank must call it."""
        return gather_rows_to_main(t, shard_sizes(self.head.num_classes, self.head.world_size))

    def own_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full num_classes-row tensor (e.g. from a checkpoint made on any number of ranks)."""
        if full.shape[0] != self.head.num_classes:
            raise ValueError(f"a head of {full.shape[0]} classes does not fit {self.head.num_classes} classes")
        return full[self.head.start:self.head.stop]


def sharded_builder(rank: int, world_size: int, seed: int):
    """A ``classification`` builder for :func:`train.losses.build_loss` that makes this rank's
    :class:`ShardedMarginLoss` from a loss section (margin heads only)."""

    def build(cfg: dict, embedding_size: int, num_classes: int) -> ShardedMarginLoss:
        kind = str(cfg.get("head", "arcface")).lower()
        if kind not in MARGIN_HEADS:
            raise ValueError(f"loss.sharded needs a margin head ({', '.join(MARGIN_HEADS)}), got loss.head={kind}")
        return ShardedMarginLoss(embedding_size, num_classes, margin_from_config(cfg),
                                 float(cfg.get("label_smoothing", 0.0)), float(cfg.get("focal_gamma", 0.0)),
                                 float(cfg.get("sample_rate", 1.0)), rank, world_size, seed)

    return build


# ---------------------------------------------------------------------------------- checkpoint helpers
def _shard_keys(criterion: nn.Module) -> dict[str, ShardedMarginLoss]:
    """State-dict key of each sharded part's weight in ``criterion`` → the part."""
    return {f"{name}.head.weight": m for name, m in criterion.named_modules() if isinstance(m, ShardedMarginLoss)}


def full_head_state(criterion: nn.Module) -> dict | None:
    """``criterion.state_dict()`` with every shard reassembled into the full head (rank 0; None elsewhere).
    A collective: every rank calls it."""
    state = criterion.state_dict()
    for key, part in _shard_keys(criterion).items():
        state[key] = part.full_rows(state[key])
    return state if all(v is not None for v in state.values()) else None


def own_head_state(criterion: nn.Module, full: dict) -> dict:
    """A full-head state dict (any number of ranks made it) cut down to this rank's shards."""
    full = dict(full)
    for key, part in _shard_keys(criterion).items():
        full[key] = part.own_rows(full[key])
    return full


def _shard_params(optimizer: torch.optim.Optimizer, criterion: nn.Module) -> dict[int, ShardedMarginLoss]:
    """Optimizer state index → sharded part, for the parameters that are shards."""
    owner = {id(m.head.weight): m for m in _shard_keys(criterion).values()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def full_optimizer_state(optimizer: torch.optim.Optimizer, criterion: nn.Module) -> dict | None:
    """``optimizer.state_dict()`` with the shards' per-row state (momentum, Adam moments) reassembled
    (rank 0; None elsewhere). A collective: every rank calls it."""
    state = optimizer.state_dict()
    for i, part in _shard_params(optimizer, criterion).items():
        entry = dict(state["state"].get(i, {}))
        for name in sorted(entry):
            v = entry[name]
            if torch.is_tensor(v) and v.dim() and v.shape[0] == part.num_local:
                entry[name] = part.full_rows(v)
        state["state"][i] = entry
    return None if any(v is None for e in state["state"].values() for v in e.values()) else state


def own_optimizer_state(optimizer: torch.optim.Optimizer, criterion: nn.Module, full: dict) -> dict:
    """A checkpoint's optimizer state cut down to this rank's shards."""
    state = {**full, "state": dict(full["state"])}
    for i, part in _shard_params(optimizer, criterion).items():
        entry = dict(state["state"].get(i, {}))
        for name, v in entry.items():
            if torch.is_tensor(v) and v.dim() and v.shape[0] == part.head.num_classes:
                entry[name] = part.own_rows(v)
        state["state"][i] = entry
    return state

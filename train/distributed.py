"""Process group and rank helpers for training under ``torchrun``, and the collectives the trainer needs.

A single process (``WORLD_SIZE`` unset or 1) never creates a process group and every helper here is then a
local no-op, so the same code runs with and without ``torchrun``. Collectives with a gradient:

* :func:`all_gather_with_grad` — rows of every rank, concatenated in rank order; the backward sums each
  rank's gradient of the gathered rows and hands every rank the part of its own rows.
* :func:`sum_over_ranks` — an all-reduced sum whose backward is the identity: right when every rank goes
  on to compute the *same* loss from the sum (as the sharded margin softmax does), since each rank's
  local gradient is then already the full derivative with respect to its own addend.
* :func:`scale_grad` — identity forward, gradient times a factor backward.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank and size, processes on this machine, its device."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is available, else the CPU; other names as torch reads them."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def local_world_size() -> int:
    """Processes of this job on this machine (``LOCAL_WORLD_SIZE`` as torchrun sets it; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); a single process joins none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_world_size(), device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (a host synchronisation: call it at log boundaries only)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no gradient; queued without a host synchronisation on NCCL)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks of a tensor without gradient (a new tensor)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (equal shapes) concatenated along dim 0 in rank order, without gradient."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's gradient of every row, summed
        r = rank()
        return grad[r * ctx.n:(r + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank (equal row counts) in rank order; gradients flow back to their owners."""
    return _AllGatherWithGrad.apply(x) if is_distributed() else x


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks; the backward is the identity (see the module docstring)."""
    return _SumOverRanks.apply(x) if is_distributed() else x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged; its gradient multiplied by ``factor`` on the way back."""
    if factor == 1 or not x.requires_grad:
        return x
    factor = float(factor)
    y = x.view_as(x)
    y.register_hook(lambda grad: grad * factor)
    return y


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BN running statistics), as DDP does before each forward."""
    if not is_distributed():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src)


def gather_rows_to_main(t: torch.Tensor, rows_per_rank: list[int], chunk_rows: int = 1 << 16) -> torch.Tensor | None:
    """Every rank's row block of one matrix, stacked in rank order into a CPU tensor on rank 0 (None elsewhere).

    Blocks may differ in length (``rows_per_rank``); they travel in chunks of ``chunk_rows`` rows by
    point-to-point messages, so no rank ever holds more than its block plus one chunk on its device.
    """
    if not is_distributed():
        return t.detach().cpu().clone()
    me, out = rank(), None
    if me == 0:
        out = torch.empty((sum(rows_per_rank), *t.shape[1:]), dtype=t.dtype)
        out[:rows_per_rank[0]] = t.detach().cpu()
    start = rows_per_rank[0]
    for src in range(1, world_size()):
        n = rows_per_rank[src]
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            if me == src:
                dist.send(t.detach()[a:b].contiguous(), dst=0)
            elif me == 0:
                buf = torch.empty((b - a, *t.shape[1:]), dtype=t.dtype, device=t.device)
                dist.recv(buf, src=src)
                out[start + a:start + b] = buf.cpu()
        start += n
    return out


def check_ddp_registration(ddp, optimizer: torch.optim.Optimizer, outside: list[torch.nn.Parameter]) -> None:
    """Assert that the parameters DDP registered (those of its module with ``requires_grad`` at
    construction, as its reducer reports them) are exactly the optimizer's parameters outside ``outside``
    (the sharded head, which lives outside DDP by design). A mismatch would let ranks drift apart."""
    registered = [p for p in ddp.module.parameters() if p.requires_grad]
    skip = {id(p) for p in outside}
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"] if id(p) not in skip}
    mine = {id(p) for p in ddp.module.parameters()}
    if {id(p) for p in registered} != optimised:
        extra = len(optimised - mine)
        raise AssertionError(f"DDP registered {len(registered)} parameter tensors but the optimizer updates "
                             f"{len(optimised)} outside the sharded head ({extra} of them unknown to DDP)")
    try:
        logged = ddp._get_ddp_logging_data()  # the reducer's own count (a private but stable API)
    except Exception:  # pragma: no cover - older/newer torch without it: the set check above stands
        return
    size = sum(p.numel() * p.element_size() for p in registered)
    if logged.get("num_parameter_tensors", len(registered)) != len(registered) or \
            logged.get("total_parameter_size_bytes", size) != size:
        raise AssertionError(f"DDP's reducer holds {logged.get('num_parameter_tensors')} tensors / "
                             f"{logged.get('total_parameter_size_bytes')} bytes; the optimizer updates "
                             f"{len(registered)} / {size}")

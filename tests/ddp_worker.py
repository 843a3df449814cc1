"""One rank of the multi-process training tests, started by ``torchrun`` (gloo, CPU) from tests/test_train_ddp.py.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/ddp_worker.py SPEC.json

SPEC ``{"scenario": "train", "overrides": [...], "resume": false, "dump": DIR}`` runs the trainer and writes
``DIR/rank<r>.pt`` (backbone state with buffers, head state, optimizer state) and ``DIR/steps_rank<r>.json``
(per step: the dataset indices of this rank, the learning rate used, the schedule step before it).
``{"scenario": "sharded_vs_full", "dump": DIR}`` compares the sharded head with the full head on a small
DDP model and writes ``DIR/compare_rank<r>.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.config import load_config
from train.trainer import Trainer


def run_training(spec: dict) -> None:
    cfg = load_config(None, spec["overrides"])
    steps: list[dict] = []

    def record(t: Trainer) -> None:
        steps.append({"step": t.step, "indices": t.last_indices.tolist(), "lr": t.lr})

    trainer = Trainer(cfg, resume=spec.get("resume", False), callbacks=[record])
    before = trainer.position.schedule_step
    initial = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    summary = trainer.train()
    dump = Path(spec["dump"])
    dump.mkdir(parents=True, exist_ok=True)
    rank = trainer.rank
    torch.save({"model": trainer.backbone.state_dict(), "head": trainer.criterion.state_dict(),
                "optimizer": trainer.optimizer.state_dict()["state"], "summary": summary,
                "start_schedule_step": before, "position": trainer.position.state_dict(), "initial_model": initial},
               dump / f"rank{rank}.pt")
    (dump / f"steps_rank{rank}.json").write_text(json.dumps(steps))


def sharded_vs_full(spec: dict) -> None:
    """Loss, backbone (DDP-averaged) gradients and head gradients of the sharded head vs the full head on
    the same global batch, for several margin/loss settings; and the head memory per rank."""
    from train.losses import build_loss
    from train.sharded_head import init_class_rows, sharded_builder

    rank, world = dist.get_rank(), dist.get_world_size()
    classes, dim, n_local, feat = 11, 16, 6, 20
    out = {"cases": {}}
    cases = {"arcface": {"head": "arcface", "s": 32.0, "m": 0.5},
             "cosface_smooth": {"head": "cosface", "s": 32.0, "m": 0.35, "label_smoothing": 0.1},
             "combined_focal_smooth": {"head": "combined", "s": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.2,
                                       "label_smoothing": 0.1, "focal_gamma": 2.0}}
    for name, section in cases.items():
        g = torch.Generator().manual_seed(7)
        x_all = torch.randn(world * n_local, feat, generator=g)
        y_all = torch.randint(0, classes, (world * n_local,), generator=g)
        y_all[3] = -1  # an unlabelled row
        backbone = torch.nn.Linear(feat, dim)
        ddp = torch.nn.parallel.DistributedDataParallel(backbone)  # rank 0's initial weights on every rank
        reference = torch.nn.Linear(feat, dim)
        reference.load_state_dict(backbone.state_dict())
        full = build_loss({"loss": section}, classes, dim)
        with torch.no_grad():
            full.parts[section["head"]].head.weight.copy_(init_class_rows(0, classes, dim, seed=0))
        sharded = build_loss({"loss": section}, classes, dim, classification=sharded_builder(rank, world, 0))
        part = sharded.parts[section["head"]]
        rows = slice(rank * n_local, (rank + 1) * n_local)
        loss, _ = sharded(ddp(x_all[rows]), y_all[rows])
        loss.backward()
        ref_loss, _ = full(reference(x_all), y_all)
        ref_loss.backward()
        ref_head_grad = full.parts[section["head"]].head.weight.grad[part.head.start:part.head.stop]
        out["cases"][name] = {
            "loss": float(loss.detach()), "ref_loss": float(ref_loss.detach()),
            "backbone_grad_max_diff": max(float((a.grad - b.grad).abs().max()) for a, b in
                                          zip(backbone.parameters(), reference.parameters())),
            "backbone_grad_max": max(float(b.grad.abs().max()) for b in reference.parameters()),
            "head_grad_max_diff": float((part.head.weight.grad - ref_head_grad).abs().max()),
            "head_grad_max": float(ref_head_grad.abs().max())}
    out["memory"] = head_memory(rank, world)
    Path(spec["dump"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["dump"]) / f"compare_rank{rank}.json").write_text(json.dumps(out))


def head_memory(rank: int, world: int, classes: int = 4000, dim: int = 128) -> dict:
    """Bytes of the head's weight, gradient and SGD momentum after one step: this rank's shard vs a full head."""
    from train.losses import build_loss
    from train.sharded_head import sharded_builder

    def measure(loss_module, emb, labels) -> int:
        opt = torch.optim.SGD(loss_module.parameters(), lr=0.1, momentum=0.9)
        value, _ = loss_module(emb, labels)
        value.backward()
        opt.step()
        tensors = [p for p in loss_module.parameters()] + [p.grad for p in loss_module.parameters()]
        tensors += [s["momentum_buffer"] for s in opt.state.values()]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    g = torch.Generator().manual_seed(3)
    emb_all = torch.randn(world * 8, dim, generator=g)
    y_all = torch.randint(0, classes, (world * 8,), generator=g)
    section = {"head": "arcface", "s": 64.0, "m": 0.5}
    full_bytes = measure(build_loss({"loss": section}, classes, dim), emb_all, y_all) if rank == 0 else 0
    rows = slice(rank * 8, (rank + 1) * 8)
    shard_bytes = measure(build_loss({"loss": section}, classes, dim, classification=sharded_builder(rank, world, 0)),
                          emb_all[rows], y_all[rows])
    return {"classes": classes, "dim": dim, "full_bytes": full_bytes, "shard_bytes": shard_bytes}


def main() -> int:
    """Run the scenario of the SPEC file named on the command line (run with the repository on PYTHONPATH)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        if spec["scenario"] == "train":
            run_training(spec)
        else:
            dist.init_process_group("gloo")
            sharded_vs_full(spec)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

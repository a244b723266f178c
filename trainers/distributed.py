"""Data-parallel training over torch.distributed, written so that W processes reproduce one process
with the same global batch.

Every rank draws the same global batch (the sample order comes from the shared epoch generator) and
augments all of it with the same generator, then keeps its own slice: the random stream stays
identical on every rank, so rank r's rows r, r+W, r+2W… are exactly what a single process would
have there. Rows are dealt out interleaved, not in blocks, because that is how one process's
SplitBatchNorm (moco's CIFAR demo, ``bn_splits``) groups them: W ranks with bn_splits=s normalise
the same groups as one process with bn_splits=W·s. This costs W× the augmentation work, which is
cheap next to the encoders, and buys exactness: tests/unit/test_distributed.py checks a 2-process
run against a 1-process run.

What moco#16 and lightly#1018 got wrong is handled in the methods: keys and bank entries are
gathered from all ranks (``gather``, moco's ``concat_all_gather``) before they enter the queue or the
memory bank, and the key encoder's BatchNorm sees a batch shuffled across ranks (shuffle-BN).
Gradients are averaged over ranks in one flattened all-reduce per step (``average_gradients``).
Rank 0 alone writes checkpoints and talks to the metrics sink.

A process group is started from the usual environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; submitit's ``TorchDistributedEnvironment`` exports them on SLURM), by ``init_from_env``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env() -> World:
    """Join the process group the environment describes (a no-op for a single process): gloo on the
    CPU, nccl when CUDA is present."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or world().size > 1:
        return world()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=size)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return world()


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch: rows rank, rank+W, … (all of it for one process)."""
    w = world()
    if w.size == 1:
        return x
    return x[w.rank::w.size]


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch back from every rank's ``local`` rows (no gradient): moco's
    concat_all_gather, with the rows put back in their global order."""
    w = world()
    if w.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])


def mean(value: float) -> float:
    """The mean of a scalar over ranks."""
    w = world()
    if w.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / w.size


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one all-reduce of the flattened gradients."""
    w = world()
    if w.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()

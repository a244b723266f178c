"""Data-parallel training over torch.distributed, written so that W processes reproduce one process
with the same global batch.

Every rank knows the global batch of every step (the sample order comes from the shared epoch
generator) and reads only its own rows of it: rows r, r+W, r+2W… (trainers/loader.py). Each
sample's augmentation is keyed by its index (trainers/keyed.py), so rank r's rows are exactly what a
single process would have there. Rows are dealt out interleaved, not in blocks, because that is
how one process's SplitBatchNorm (moco's CIFAR demo, ``bn_splits``) groups them: W ranks with
bn_splits=s normalise the same groups as one process with bn_splits=W·s.
tests/unit/test_distributed.py checks a 2-process run against a 1-process run.

What moco#16 and lightly#1018 got wrong is handled in the methods: keys and bank entries are
gathered from all ranks (``gather``, moco's ``concat_all_gather``) before they enter the queue or the
memory bank, and the key encoder's BatchNorm sees a batch shuffled across ranks (shuffle-BN).
Gradients are averaged by torch's DistributedDataParallel (trainers/loop.py). Rank 0 alone writes
checkpoints and talks to the metrics sink.

A process group is started from the usual environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; submitit's ``TorchDistributedEnvironment`` exports them on SLURM), by
``init_from_env``. With CUDA present it serves CPU tensors through gloo and CUDA tensors through
NCCL (``backend_for``): an NCCL-only group refuses a collective on a CPU tensor ("No backend type
associated with device type cpu").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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


def backend_for(cuda: bool) -> str:
    """The process group's backend string: gloo for CPU tensors, plus NCCL for CUDA tensors when
    CUDA is present (torch's "device:backend" form)."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_from_env(backend: str | None = None) -> World:
    """Join the process group the environment describes (a no-op for a single process), with
    ``backend`` or ``backend_for(torch.cuda.is_available())``; on CUDA, this process's device is
    LOCAL_RANK modulo the visible devices."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or world().size > 1:
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend or backend_for(torch.cuda.is_available()), rank=int(os.environ["RANK"]),
                            world_size=size)
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


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over ranks, on t's device (no host round trip)."""
    w = world()
    if w.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / w.size


def global_row_mean(losses: torch.Tensor) -> torch.Tensor:
    """This rank's per-row losses (N, possibly empty) → the scalar to backpropagate so that DDP's
    mean of the ranks' gradients is the gradient of the mean over every row of the global batch:
    sum × W / (rows of all ranks). A plain per-rank mean would weight rows unequally when ranks hold
    different counts (the last partial batch), and is NaN on a rank with none; that rank must still
    backpropagate, or the others wait for it in DDP's gradient all-reduce. One all-reduce of a scalar."""
    w = world()
    if w.size == 1:
        return losses.mean()
    rows = torch.tensor(float(losses.shape[0]), device=losses.device)
    dist.all_reduce(rows)
    return losses.sum() * (w.size / rows)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``gather`` through which gradients flow back to every rank's rows (torch.distributed.nn's
    all_gather, whose backward sums each slot's gradient over ranks): SimCLR's global negatives."""
    w = world()
    if w.size == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in 2.14 for a private API; the same autograd semantics
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])


def gather_shards(x: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of range(n) held as contiguous shards (trainers/loader.Shard: rank r has rows
    [r·ceil(n/W), …)) back as the full n×… tensor on every rank."""
    w = world()
    if w.size == 1:
        return x
    per = -(-n // w.size)
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; a no-op for one process)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def _global_batch_norm(bn: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in training mode with statistics over every rank's rows (x: N×C or N×C×H×W).

    torch's SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), so this one,
    which runs on CPU (gloo) and CUDA (NCCL) alike, is what tests/unit/test_distributed.py can check
    against one process. The sums go through torch.distributed.nn's differentiable all_reduce, whose
    backward sums each rank's gradient, so the statistics' gradient reaches every rank's rows."""
    from torch.distributed.nn.functional import all_reduce

    dims = [0] + list(range(2, x.dim()))
    xf = x.float()
    count = torch.full((1,), float(xf.numel() // xf.shape[1]), device=x.device)
    stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
    c = x.shape[1]
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp_(min=0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class GlobalBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch (all ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world().size == 1:
            return super().forward(x)
        return _global_batch_norm(self, x)


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (all ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world().size == 1:
            return super().forward(x)
        return _global_batch_norm(self, x)


def global_batchnorm(module: torch.nn.Module, two_d: bool) -> torch.nn.Module:
    """Make ``module``'s plain BatchNorm1d layers (the heads' BN) — and its BatchNorm2d layers when
    ``two_d`` (``bn_splits: 1``: one group for the whole batch) — normalise over the global batch, as
    one process does; in place, keeping every parameter and buffer name. Split BN is left alone."""
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
        elif two_d and type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module

"""The one training loop every method uses, with checkpoint/resume.

Each epoch's randomness (sample order, augmentation, key shuffling) comes from a generator seeded by
(seed, epoch), and a checkpoint holding model (queue and bank included, as buffers), optimizer,
step, epoch, history and RNG state is written by write-then-rename after every epoch. A run
resumed from the checkpoint of epoch e therefore replays epochs e+1… exactly as an uninterrupted run
would (on CPU; cuDNN kernels may differ bitwise).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers import distributed as D
from trainers.optim import build_optimizer
from trainers.schedule import lr_at
from trainers.sink import Sink

# step(images, labels, dataset indices, generator) -> (loss, metrics); indices serve memory banks
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    warmup_epochs: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"  # trainers/optim.py: sgd or lars
    exclude_bias_norm: bool = False
    lars_eta: float = 1e-3


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit(model: nn.Module, step_fn: StepFn, params: Iterable[nn.Parameter], images: torch.Tensor,
        labels: torch.Tensor, cfg: LoopConfig, ckpt_path: Path, sink: Sink,
        on_epoch_end: Callable[[int], dict[str, float]] | None = None) -> list[dict[str, float]]:
    """Train ``model`` by ``step_fn`` over uint8 ``images`` for cfg.epochs, resuming from ``ckpt_path``
    if it exists. Returns the per-epoch history (mean loss, lr, ...).

    Under torch.distributed (trainers/distributed.py) every rank gets the same global batch of
    cfg.batch_size images and ``step_fn`` keeps its own slice; gradients and logged values are
    averaged over ranks, and rank 0 alone writes the checkpoint (all ranks read it on resume)."""
    w = D.world()
    dev = next(model.parameters()).device
    params = [p for p in params if p.requires_grad]
    opt = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.exclude_bias_norm,
                          cfg.lars_eta)
    n = images.shape[0]
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({n} images)")
    start_epoch, step, history = 0, 0, []
    if Path(ckpt_path).exists():
        state = checkpoint.load(ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        checkpoint.set_rng_state(state["rng"])
        if w.is_main:
            sink.log({"resumed_from_epoch": float(state["epoch"] + 1)}, step=state["epoch"] + 1)
    if w.is_main:
        sink.progress(start_epoch, cfg.epochs)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(n, generator=g)
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        lr = cfg.lr
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            lr = lr_at(step, steps_per_epoch, cfg.epochs, cfg.lr, cfg.schedule, cfg.milestones, cfg.warmup_epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            x = images[idx].to(dev, non_blocking=True)
            y = labels[idx].to(dev, non_blocking=True)
            loss, metrics = step_fn(x, y, idx.to(dev), g)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {i}: lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            D.average_gradients(params)
            opt.step()
            step += 1
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        seconds = time.perf_counter() - t0
        record = {k: D.mean(v / steps_per_epoch) for k, v in totals.items()}
        record.update(lr=lr, epoch_seconds=seconds, images_per_second=steps_per_epoch * cfg.batch_size / seconds)
        if on_epoch_end is not None:
            record.update(on_epoch_end(epoch))
        history.append(record)
        if w.is_main:
            sink.log(record, step=epoch)
            checkpoint.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                                    "step": step, "history": history, "rng": checkpoint.rng_state()}, ckpt_path)
            sink.progress(epoch + 1, cfg.epochs)
        D.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
    return history

"""The one training loop every method uses, with checkpoint/resume, data parallelism and mixed
precision.

Each epoch's randomness comes from the epoch generator seeded by (seed, epoch) (sample order, key
shuffling, negatives) and from trainers/keyed.py (each sample's augmentation, keyed by its index).
A checkpoint holding model (queue and bank included, as buffers), optimizer, gradient scaler,
step, epoch, history and RNG state is written by write-then-rename after every epoch. A run
resumed from the checkpoint of epoch e therefore replays epochs e+1… exactly as an uninterrupted run
would (on CPU; cuDNN kernels may differ bitwise).

Under torch.distributed the model is wrapped in torch's DistributedDataParallel (bucketed
gradient all-reduce overlapping the backward pass); each rank reads its own rows of every global
batch (trainers/loader.py). On CUDA: channels_last, cudnn.benchmark, and autocast to the stage's
``precision`` (bf16, or fp16 with a gradient scaler); losses are computed in fp32 by the methods.
The step loop never waits on the device: losses accumulate on it, and the non-finite check reads
them back once every ``check_every`` steps and at the epoch's end.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers import distributed as D
from trainers.loader import Batch, epoch_order, local_steps
from trainers.optim import build_optimizer
from trainers.schedule import lr_at
from trainers.sink import Sink

PRECISIONS = ("bf16", "fp16", "fp32")



@dataclass(frozen=True)
class StepAt:
    """Where a step is: ``step`` counts optimizer steps from 0 over the whole run (resumed runs
    continue the count), ``epoch`` from 0; ``steps_per_epoch`` and ``epochs`` give the run's length,
    for schedules of the method's own (BYOL's tau, DINO's teacher temperature, SwAV's freezing)."""

    step: int
    epoch: int
    steps_per_epoch: int
    epochs: int


# step(net, inputs, labels, dataset indices, generator, at) -> (loss, metrics): inputs are this
# rank's rows of each view; ``net`` is the model, wrapped in DistributedDataParallel under
# torch.distributed (call it, not the model, so that gradients are averaged); metrics are tensors
# on the device; ``at`` is a StepAt.
StepFn = Callable[[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Generator, StepAt],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]
# after_backward(model, at): between the backward pass and the optimizer step, gradients unscaled
AfterBackward = Callable[[nn.Module, StepAt], None]


class Batches(Protocol):
    """What ``fit`` reads (trainers/loader.py): the number of samples, each epoch's batches for the
    steps' index lists, and a close that ends any workers."""

    def __len__(self) -> int: ...
    def epoch(self, epoch: int, steps: list[torch.Tensor]) -> Iterator[Batch]: ...
    def close(self) -> None: ...


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
    precision: str = "fp32"  # bf16 | fp16 | fp32: autocast dtype of the forward pass
    clip_grad_norm: float | None = None  # clip the global gradient L2 norm to this (torch.nn.utils.clip_grad_norm_)
    check_every: int = 50  # steps between non-finite checks (each one reads a scalar back from the device)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str) -> str:
    """``auto`` (a spec that did not come through pipeline/, which resolves it per stage) becomes
    bf16 where CUDA supports it, else fp32; other values are returned as they are."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast(dev: torch.device, precision: str):
    """The autocast context of ``precision`` on ``dev`` (a no-op for fp32; ``auto`` as
    ``resolve_precision``). Raises ValueError for an unknown precision."""
    precision = resolve_precision(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: valid values are {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prepare(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` on ``dev``; on CUDA in channels_last with cudnn.benchmark on (fixed input sizes)."""
    model.to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    return model


def data_parallel(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torch.distributed, else itself. Buffers
    (queue, memory bank, BN statistics) are not broadcast: the methods keep the queue and bank
    equal on every rank themselves, and BN statistics stay per rank as in moco."""
    if D.world().size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; 2.11 (our GPU machines) knows only it
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)


def fit(model: nn.Module, step_fn: StepFn, data: Batches, cfg: LoopConfig, ckpt_path: Path, sink: Sink,
        on_epoch_end: Callable[[int], dict[str, float]] | None = None, drop_last: bool = True,
        after_backward: AfterBackward | None = None) -> list[dict[str, float]]:
    """Train ``model`` by ``step_fn`` on ``data`` (trainers/loader.py) for cfg.epochs, resuming from
    ``ckpt_path`` if it exists. Returns the per-epoch history (mean loss, lr, images/s, ...).

    ``drop_last``: drop each epoch's last partial global batch (pretraining) or train on it too
    (the probe). Kept, it may give a rank fewer rows than the others, or none (fewer rows than
    processes): ``step_fn`` must then weight rows, not ranks, and return a loss to backpropagate
    even for no rows (trainers/distributed.py ``global_row_mean``). Raises ValueError when the
    batch is larger than the data, and FloatingPointError, naming the epoch and step range, when
    the loss stops being finite. ``after_backward`` runs after each backward pass, before gradient
    clipping (``cfg.clip_grad_norm``) and the optimizer step."""
    w = D.world()
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.exclude_bias_norm,
                          cfg.lars_eta)
    scaler = torch.amp.GradScaler(dev.type, enabled=resolve_precision(cfg.precision) == "fp16")
    n = len(data)
    steps_per_epoch = n // cfg.batch_size if drop_last else -(-n // cfg.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the dataset ({n} images)")
    start_epoch, step, history, logged_ms = _resume(model, opt, scaler, ckpt_path, sink)
    net = data_parallel(model, dev)
    if w.is_main:
        sink.progress(start_epoch, cfg.epochs)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            g = epoch_generator(cfg.seed, epoch)
            steps = local_steps(epoch_order(n, g), cfg.batch_size, drop_last)
            totals: dict[str, torch.Tensor] = {}
            window, window_start = torch.zeros((), device=dev), 0
            t0 = time.perf_counter()
            lr = cfg.lr
            for i, (inputs, y, idx) in enumerate(data.epoch(epoch, steps)):
                lr = lr_at(step, steps_per_epoch, cfg.epochs, cfg.lr, cfg.schedule, cfg.milestones, cfg.warmup_epochs)
                for group in opt.param_groups:
                    group["lr"] = lr
                if dev.type == "cuda":
                    inputs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
                at = StepAt(step, epoch, steps_per_epoch, cfg.epochs)
                with autocast(dev, cfg.precision):
                    loss, metrics = step_fn(net, inputs, y, idx, g, at)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if after_backward is not None or cfg.clip_grad_norm is not None:
                    scaler.unscale_(opt)  # the hooks see true gradients (a no-op without fp16's scaler)
                    if after_backward is not None:
                        after_backward(model, at)
                    if cfg.clip_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                scaler.step(opt)
                scaler.update()
                step += 1
                loss = loss.detach().float()
                window = window + loss
                totals["loss"] = totals.get("loss", 0.0) + loss
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
                if (i + 1) % cfg.check_every == 0 or i + 1 == steps_per_epoch:
                    _check_finite(window, epoch, window_start, i)
                    window, window_start = torch.zeros((), device=dev), i + 1
            seconds = time.perf_counter() - t0
            names = sorted(totals)
            means = D.all_mean(torch.stack([torch.as_tensor(totals[k], device=dev) for k in names]) / steps_per_epoch)
            record = dict(zip(names, means.tolist()))
            images = steps_per_epoch * cfg.batch_size if drop_last else n
            record.update(lr=lr, epoch_seconds=seconds, images_per_second=images / seconds)
            if on_epoch_end is not None:
                record.update(on_epoch_end(epoch))
            history.append(record)
            if w.is_main:
                # saved first, then logged: a failed save (a full disk) logs nothing that the resumed run
                # logs again; the time goes into the checkpoint, so that a resume re-logs the same point
                logged_ms.append(int(time.time() * 1000))
                _save(model, opt, scaler, epoch, step, history, ckpt_path, logged_ms)
                sink.log(record, step=epoch, timestamp_ms=logged_ms[-1])
                sink.progress(epoch + 1, cfg.epochs)
            D.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
    finally:
        data.close()
    return history


def _resume(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ckpt_path: Path,
            sink: Sink) -> tuple[int, int, list[dict[str, float]], list[int]]:
    """(first epoch to run, optimizer steps so far, history, each epoch's log time in Unix ms) after
    loading ``ckpt_path`` into model, optimizer, scaler and the RNGs, if it exists
    (trainers/checkpoint.py ``load_resume``: the checkpoint before it when it is damaged, with a
    warning); (0, 0, [], []) otherwise. The last saved epoch's record is logged again with its saved
    time: a stage that died between its save and its log loses no point, and one that logged it logs
    the identical point, which MLflow keeps once."""
    main = D.world().is_main
    state = checkpoint.load_resume(ckpt_path, sink.warn if main else None)
    if state is None:
        return 0, 0, [], []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    logged_ms = list(state.get("logged_ms", []))  # absent from checkpoints written before it was kept
    if main:
        if state["history"] and len(logged_ms) == len(state["history"]):
            sink.log(state["history"][-1], step=state["epoch"], timestamp_ms=logged_ms[-1])
        sink.log({"resumed_from_epoch": float(state["epoch"] + 1)}, step=state["epoch"] + 1)
    return state["epoch"] + 1, state["step"], state["history"], logged_ms


def _save(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, step: int,
          history: list[dict[str, float]], ckpt_path: Path, logged_ms: list[int]) -> None:
    """The resume checkpoint after ``epoch``, the one it replaces kept as the fallback."""
    checkpoint.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                            "epoch": epoch, "step": step, "history": history, "rng": checkpoint.rng_state(),
                            "logged_ms": logged_ms}, ckpt_path, keep_previous=True)


def _check_finite(window: torch.Tensor, epoch: int, first: int, last: int) -> None:
    """One read-back of the summed losses of steps first..last of ``epoch``."""
    if not bool(torch.isfinite(window)):
        raise FloatingPointError(f"the loss is not finite (sum {float(window)}) in epoch {epoch}, steps {first}-{last}: "
                                 f"lower the lr, or use precision fp32/bf16 if this is fp16")

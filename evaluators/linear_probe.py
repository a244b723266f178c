"""Linear probe on a frozen backbone: top-1 of a linear classifier on pooled features h.

Two protocols, recorded in the result as ``protocol``:

- ``moco``: facebookresearch/moco main_lincls.py. Every epoch sees fresh RandomResizedCrop + flip
  views pushed through the frozen backbone (in eval mode, so BN statistics cannot move); fc
  initialised N(0, 0.01), SGD lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, ×0.1 at 60 and 80.
- ``cached`` (default): the backbone runs once over un-augmented train and val images; the same
  classifier and schedule are then trained on the stored features. This trades the probe's crop
  augmentation for a cost independent of the backbone; bench/linear_probe.py measures both.

Both train on every image each epoch, as main_lincls does (its DataLoader keeps the last partial
batch): ``drop_last: false``; ``true`` is what probe stages did before the field existed. Each
step's loss is the mean over the rows of the global batch, however unevenly the processes hold them.

Validation is on the un-augmented ``val`` split, after every epoch. Like main_lincls's
``sanity_check``, the stage fails if any backbone tensor (weights or BN statistics) changed.

``repeats: N`` (``cached`` only) trains N probes on the same stored features, with the seeds of
``probe_seeds``, one after the other in the stage: the stage's ``top1`` and ``best_top1`` are their
means, ``top1_probe_sd`` their standard deviation and ``top1_probe<i>`` each probe's. Averaging
divides the probe's own variance (its initialisation and batch order on fixed features) by N at the
cost of N probes on features, not of N backbone passes; bench/variance_split.py measures that share.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.augment import PROBE_VIEW, AugmentParams
from trainers.data import load_split
from trainers.distributed import global_row_mean
from trainers.features import frozen_features
from trainers.files import StageDir
from trainers.loader import TensorBatches, image_batches
from trainers.loop import LoopConfig, device, fit, prepare, resolve_precision
from trainers.losses import full_precision
from trainers.pretrain import load_backbone
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig
    from pipeline.stages import ProbeSpec

PROTOCOLS = ("cached", "moco")


class BackboneChanged(AssertionError):
    pass


@torch.no_grad()
def sanity_check(backbone: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor must equal its value before the probe (moco main_lincls sanity_check)."""
    for name, value in backbone.state_dict().items():
        if not torch.equal(value.cpu(), before[name]):
            raise BackboneChanged(f"backbone tensor {name} changed during the linear probe")


SEED_MASK = 2**31 - 1  # probe seeds stay in pipeline/spec.py's MAX_SEED range (NumPy and sklearn take 32 bits)


def probe_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a stage's ``n`` probes when its ``linear_probe.seed`` is ``seed``: ``seed`` first,
    so that one probe is the stage as it was before ``repeats`` existed; then, for i = 1..n-1, the
    first 32-bit word of NumPy's ``SeedSequence(seed, spawn_key=(i,))`` (its documented way to derive
    independent streams), masked to 31 bits. Not seed + i: a grid's replicates have seeds 0, 1, 2, …,
    so replicate 0's second probe would share its initialisation and batch order with replicate
    1's first, and the replicates' probes would not be independent draws."""
    return [seed] + [int(np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(1)[0]) & SEED_MASK
                     for i in range(1, n)]


class _ProbeSink:
    """Probe ``i`` of ``n``'s view of the stage's sink: its per-epoch metrics get the suffix
    ``_probe<i>`` (so the N probes' series stay apart in MLflow), and its progress counts within
    the stage's n × epochs."""

    def __init__(self, sink: Sink, i: int, n: int):
        self.sink, self.i, self.n = sink, i, n

    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
        self.sink.log({f"{k}_probe{self.i}": v for k, v in metrics.items()}, step, timestamp_ms=timestamp_ms)

    def artifact(self, path: Path) -> None:
        self.sink.artifact(path)

    def progress(self, done: int, total: int) -> None:
        self.sink.progress(self.i * total + done, self.n * total)

    def warn(self, message: str) -> None:
        self.sink.warn(f"probe {self.i}: {message}")


def _classifier(dim: int, num_classes: int, seed: int, dev: torch.device) -> nn.Linear:
    """fc (dim → num_classes) initialised as main_lincls: weights N(0, 0.01), biases 0, drawn after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    fc = nn.Linear(dim, num_classes)
    fc.weight.data.normal_(mean=0.0, std=0.01)  # main_lincls init
    fc.bias.data.zero_()
    return fc.to(dev)


def _train(fc: nn.Linear, step, data, p: ProbeSpec, seed: int, precision: str, val_feats: torch.Tensor,
           val_labels: torch.Tensor, ckpt: Path, sink: Sink) -> list[dict[str, float]]:
    """Train ``fc`` by ``step`` on ``data`` with ``p``'s schedule and ``seed``'s batch order, resuming
    from ``ckpt``; each epoch's record holds ``val_top1`` (percent) on ``val_feats`` (N×C)."""
    dev = next(fc.parameters()).device

    @torch.no_grad()
    def evaluate(epoch: int) -> dict[str, float]:
        logits = fc(val_feats.to(dev))  # N×classes
        return {"val_top1": 100.0 * float((logits.argmax(1).cpu() == val_labels).float().mean())}

    milestones = p.milestones if p.milestones is not None else (int(0.6 * p.epochs), int(0.8 * p.epochs))
    loop = LoopConfig(epochs=p.epochs, batch_size=min(p.batch_size, len(data)), lr=p.lr,
                      weight_decay=p.weight_decay, momentum=p.momentum, schedule="step",
                      milestones=tuple(milestones), seed=seed, precision=precision)
    # drop_last false: every image each epoch, as main_lincls (its DataLoader keeps the last partial
    # batch); true: what probe stages did before the field, which its legacy value keeps
    return fit(fc, step, data, loop, ckpt, sink, on_epoch_end=evaluate, drop_last=p.drop_last)


def _cached_step(net: nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator,
                 at) -> tuple[torch.Tensor, dict]:
    with full_precision():
        return global_row_mean(F.cross_entropy(net(inputs[0].float()), y, reduction="none")), {}


def cached_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, p: ProbeSpec, seed: int, ckpt: Path, sink: Sink,
                 precision: str = "fp32") -> list[dict[str, float]]:
    """One linear probe on stored features: fc on ``train_feats`` (N×C float32) and
    ``train_labels`` (N int64), trained with ``p``'s schedule, initialised and shuffled by ``seed``
    (``p.seed`` is not read), resumed from ``ckpt`` if it exists. Returns the per-epoch history,
    each record's ``val_top1`` the percent of ``val_labels`` that fc gets right on ``val_feats``."""
    dev = device()
    fc = _classifier(val_feats.shape[1], num_classes, seed, dev)
    return _train(fc, _cached_step, TensorBatches(train_feats, train_labels, dev), p, seed, precision, val_feats,
                  val_labels, ckpt, sink)


def probe_checkpoint(workdir: Path, i: int) -> Path:
    """Probe ``i``'s resume checkpoint: the stage's ``last.pt`` for the first (as before repeats),
    ``checkpoints/last-probe<i>.pt`` for the others."""
    stage = StageDir(workdir)
    return stage.last if i == 0 else stage.checkpoints / f"last-probe{i}.pt"


def summary(histories: list[list[dict[str, float]]], val_images: int) -> dict[str, float]:
    """The stage's metrics from its probes' histories: ``top1`` and ``best_top1`` (percent), each the
    mean over the probes of the last and the best epoch's ``val_top1``; ``val_images``, the images
    top-1 is counted on (its resolution: 100 / val_images points). With several probes also
    ``top1_probe<i>`` (each last epoch's), ``top1_probe_sd`` (their sample standard deviation,
    n − 1 in the denominator) and ``repeats``."""
    last = [h[-1]["val_top1"] for h in histories]
    out = {"top1": statistics.fmean(last), "best_top1": statistics.fmean(max(r["val_top1"] for r in h) for h in histories),
           "val_images": float(val_images)}
    if len(histories) > 1:
        out.update({f"top1_probe{i}": v for i, v in enumerate(last)})
        out.update(top1_probe_sd=statistics.stdev(last), repeats=float(len(histories)))
    return out


def linear_probe(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone`` and ``cfg.linear_probe``; ``upstream``: the
    pretraining stage's result (its ``checkpoint``). Its result's metrics (``summary``): ``top1`` and
    ``best_top1`` (percent, on the val split; the mean over the probes with ``repeats`` > 1, with
    ``top1_probe_sd`` and ``top1_probe<i>``), ``val_images``, and ``epochs``; its info: ``protocol``,
    and ``probe_seeds`` with several probes. Every rank of a torch.distributed job calls this:
    features are extracted in shards, and the ``moco`` protocol's crops are read per rank
    (trainers/loader.py), with fc under DistributedDataParallel. Raises BackboneChanged if a
    backbone tensor moved, ValueError for an unknown mode or ``repeats`` > 1 outside ``cached``
    (the grid refuses it first), DataError (trainers/data.py) for unreadable data."""
    p = cfg.linear_probe
    if p.mode not in PROTOCOLS:
        raise ValueError(f"unknown probe mode {p.mode!r}: valid modes are {', '.join(PROTOCOLS)}")
    if p.repeats > 1 and p.mode != "cached":
        raise ValueError(f"linear_probe.repeats {p.repeats} needs mode cached, not {p.mode!r}")
    dev = device()
    precision = resolve_precision(p.precision)
    backbone = prepare(load_backbone(cfg, upstream.checkpoint), dev)
    backbone.requires_grad_(False)
    before = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    train, val = load_split(cfg.dataset, "train"), load_split(cfg.dataset, "val")
    aug = AugmentParams()

    def features(split: str, images) -> torch.Tensor:  # N×C, float32, CPU
        return frozen_features(backbone, images, upstream.checkpoint, cfg.dataset, split, aug, precision)

    val_feats = features("val", val.images)
    num_classes = len(train.classes)
    seeds = probe_seeds(p.seed, p.repeats)

    if p.mode == "cached":
        train_feats = features("train", train.images)
        histories = [cached_probe(train_feats, train.labels, val_feats, val.labels, num_classes, p, seed,
                                  probe_checkpoint(workdir, i), sink if len(seeds) == 1 else _ProbeSink(sink, i, len(seeds)),
                                  precision)
                     for i, seed in enumerate(seeds)]
    else:
        fc = _classifier(val_feats.shape[1], num_classes, p.seed, dev)
        data = image_batches(train, (PROBE_VIEW,), cfg.dataset.image_size, p.seed, dev, cfg.dataset.workers)

        def step(net: nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator, at):
            with torch.no_grad():
                h = backbone(inputs[0])  # b×C
            with full_precision():
                return global_row_mean(F.cross_entropy(net(h.float()), y, reduction="none")), {}

        histories = [_train(fc, step, data, p, p.seed, precision, val_feats, val.labels, probe_checkpoint(workdir, 0),
                            sink)]
    sanity_check(backbone, before)
    metrics = summary(histories, len(val))
    sink.log(metrics, step=p.epochs)
    info = {"protocol": p.mode, **({"probe_seeds": seeds} if len(seeds) > 1 else {})}
    return EvalResult({**metrics, "epochs": p.epochs}, step=p.epochs, info=info)

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
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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

PROTOCOLS = ("cached", "moco")


class BackboneChanged(AssertionError):
    pass


@torch.no_grad()
def sanity_check(backbone: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor must equal its value before the probe (moco main_lincls sanity_check)."""
    for name, value in backbone.state_dict().items():
        if not torch.equal(value.cpu(), before[name]):
            raise BackboneChanged(f"backbone tensor {name} changed during the linear probe")


def linear_probe(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone`` and ``cfg.linear_probe``; ``upstream``: the
    pretraining stage's result (its ``checkpoint``). Its result's metrics: ``top1`` and ``best_top1`` (percent, on
    the val split), ``protocol`` and ``epochs``. Every rank of a torch.distributed job calls this:
    features are extracted in shards, and the ``moco`` protocol's crops are read per rank
    (trainers/loader.py), with fc under DistributedDataParallel. Raises BackboneChanged if a
    backbone tensor moved, ValueError for an unknown mode, DataError (trainers/data.py) for
    unreadable data."""
    p = cfg.linear_probe
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

    torch.manual_seed(p.seed)
    fc = nn.Linear(val_feats.shape[1], num_classes)
    fc.weight.data.normal_(mean=0.0, std=0.01)  # main_lincls init
    fc.bias.data.zero_()
    fc.to(dev)

    if p.mode == "cached":
        data = TensorBatches(features("train", train.images), train.labels, dev)

        def step(net: nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator, at):
            with full_precision():
                return global_row_mean(F.cross_entropy(net(inputs[0].float()), y, reduction="none")), {}
    elif p.mode == "moco":
        data = image_batches(train, (PROBE_VIEW,), cfg.dataset.image_size, p.seed, dev, cfg.dataset.workers)

        def step(net: nn.Module, inputs: list[torch.Tensor], y: torch.Tensor, idx: torch.Tensor, g: torch.Generator, at):
            with torch.no_grad():
                h = backbone(inputs[0])  # b×C
            with full_precision():
                return global_row_mean(F.cross_entropy(net(h.float()), y, reduction="none")), {}
    else:
        raise ValueError(f"unknown probe mode {p.mode!r}: valid modes are {', '.join(PROTOCOLS)}")

    @torch.no_grad()
    def evaluate(epoch: int) -> dict[str, float]:
        logits = fc(val_feats.to(dev))  # N×classes
        return {"val_top1": 100.0 * float((logits.argmax(1).cpu() == val.labels).float().mean())}

    milestones = p.milestones if p.milestones is not None else (int(0.6 * p.epochs), int(0.8 * p.epochs))
    loop = LoopConfig(epochs=p.epochs, batch_size=min(p.batch_size, len(train)), lr=p.lr,
                      weight_decay=p.weight_decay, momentum=p.momentum, schedule="step",
                      milestones=tuple(milestones), seed=p.seed, precision=precision)
    # drop_last false: every image each epoch, as main_lincls (its DataLoader keeps the last partial
    # batch); true: what probe stages did before the field, which its legacy value keeps
    history = fit(fc, step, data, loop, StageDir(workdir).last, sink, on_epoch_end=evaluate,
                  drop_last=p.drop_last)
    sanity_check(backbone, before)
    top1 = history[-1]["val_top1"]
    best = max(h["val_top1"] for h in history)
    sink.log({"top1": top1, "best_top1": best}, step=p.epochs)
    return EvalResult({"top1": top1, "best_top1": best, "epochs": p.epochs}, step=p.epochs, info={"protocol": p.mode})

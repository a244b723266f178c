"""The pretraining stage: one entry point for every method of the registry (trainers/methods/).

``pretrain(cfg, workdir, sink)`` takes the frozen StageConfig (pipeline/stages.py; its sections
``dataset``, ``backbone`` and ``pretrain`` are read), builds the method's model through its
record's ``build``, trains it with trainers/loop.py, and writes ``checkpoints/final.pt`` holding the
backbone (and the whole model's) weights.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers import distributed as D
from trainers import features
from trainers.augment import AugmentParams
from trainers.backbones import build_backbone
from trainers.data import load_split
from trainers.features import extract
from trainers.files import StageDir
from trainers.heads import build_head
from trainers.loader import image_batches
from trainers.loop import LoopConfig, device, fit, prepare, resolve_precision
from trainers.methods import METHODS
from trainers.methods.base import Context
from trainers.neighbors import knn_top1
from trainers.results import PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import AugmentSpec


def augment_params(aug: AugmentSpec) -> tuple[AugmentParams, AugmentParams]:
    """The grid's ``augment`` section → the AugmentParams of the two views. ``color_strength`` s is
    SimCLR's: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); MoCo v2's (0.4, 0.4, 0.4, 0.1) is s = 0.5. An
    explicit ``color_jitter: [b, c, s, h]`` (MoCo v1: 0.4 each) takes precedence. ``view2_blur_p`` and
    ``view2_solarize_p`` make the views asymmetric, as BYOL's are (blur 1.0 / 0.1, solarize 0 / 0.2);
    unset, the second view is drawn like the first. One-view methods (InstDisc, supervised) use the first."""
    s = aug.color_strength
    jitter = tuple(aug.color_jitter) if aug.color_jitter else (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    blur = aug.blur_p if aug.blur else 0.0
    first = AugmentParams(crop_scale=tuple(aug.crop_scale), jitter=jitter, jitter_p=aug.color_p,
                          grayscale_p=aug.grayscale_p, blur_p=blur, solarize_p=aug.solarize_p,
                          flip_p=0.5 if aug.flip else 0.0)
    blur2, sol2 = aug.view2_blur_p, aug.view2_solarize_p
    second = dataclasses.replace(first, blur_p=first.blur_p if blur2 is None or not aug.blur else blur2,
                                 solarize_p=first.solarize_p if sol2 is None else sol2)
    return first, second


def pretrain(cfg: Any, workdir: Path, sink: Sink) -> PretrainResult:
    """Train ``cfg.pretrain``'s method; every rank of a torch.distributed job calls this (rank 0 writes).

    Writes ``checkpoints/last.pt`` after every epoch and ``checkpoints/final.pt`` at the end.
    Returns the PretrainResult (trainers/results.py): the checkpoint, the feature width C, the
    epochs trained and the last epoch's mean loss and accuracy. Raises ValueError for a batch size or bn_splits that the number of
    processes does not divide, or a queue longer than the data (pipeline/ refuses both before
    launch; this guards a stage started by hand), and DataError (trainers/data.py) for unreadable data."""
    p = cfg.pretrain
    method = METHODS[p.method]
    w = D.world()
    if w.size > 1 and p.batch_size % w.size:
        raise ValueError(f"pretrain.batch_size = {p.batch_size} must be a multiple of the {w.size} processes")
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    bb = cfg.backbone
    splits = bb.bn_splits
    if w.size > 1:
        # bn_splits counts BatchNorm groups in the global batch, whatever the number of processes, so
        # that a stage's identity (and its result) does not depend on how many GPUs ran it: one group
        # is BN synchronised over the processes, W·s groups are s per process
        if splits != 1 and splits % w.size:
            raise ValueError(f"backbone.bn_splits = {splits} must be 1 or a multiple of the {w.size} "
                             f"processes (it counts BatchNorm groups in the global batch)")
        bb = dataclasses.replace(bb, bn_splits=max(1, splits // w.size))
    backbone = build_backbone(bb)
    final = StageDir(workdir).final
    result = PretrainResult(checkpoint=str(final), feat_dim=backbone.feat_dim, epochs=p.epochs, processes=w.size)
    if not method.trains:  # the random-init floor every method must clear
        if w.is_main:
            checkpoint.atomic_save({"backbone": backbone.state_dict(), "method": p.method}, final)
        sink.progress(1, 1)
        return result
    data = load_split(cfg.dataset, "train")
    if method.negatives == "queue" and p.config.K >= len(data):
        # the queue would hold an older key of each query's own image, a false negative that gets
        # harder as the encoder learns: the loss then rises towards ln(K+1)
        raise ValueError(f"pretrain.K = {p.config.K} must be below the number of training images ({len(data)})")
    dev = device()
    size = cfg.dataset.image_size
    ctx = Context(size, len(data.classes), len(data), p.epochs * (len(data) // p.batch_size))
    training = method.builder()(backbone, p, ctx)
    model = training.model
    if w.size > 1:  # the heads' BN (and the backbone's at bn_splits 1) see the global batch, as in one process
        D.global_batchnorm(model, two_d=splits == 1)
    prepare(model, dev)
    loop = LoopConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.base_lr(), weight_decay=p.weight_decay,
                      momentum=p.momentum, schedule=p.schedule, milestones=tuple(p.milestones),
                      warmup_epochs=p.warmup_epochs, seed=p.seed, optimizer=p.optimizer,
                      exclude_bias_norm=p.exclude_bias_norm, lars_eta=p.lars_eta,
                      precision=resolve_precision(p.precision), clip_grad_norm=training.clip_grad_norm)
    monitor = _knn_monitor(backbone, cfg, data) if p.knn_every else None
    views = augment_params(p.augment)[:method.views]
    batches = image_batches(data, views, size, p.seed, dev, cfg.dataset.workers, cfg.dataset.decode)
    history = fit(model, training.step, batches, loop, StageDir(workdir).last, sink,
                  on_epoch_end=monitor, after_backward=training.after_backward)
    if w.is_main:
        checkpoint.atomic_save({"backbone": _cpu(backbone.state_dict()), "model": _cpu(model.state_dict()),
                                "method": p.method}, final)
        if monitor is not None and monitor.last:  # the last epoch's features are the final checkpoint's
            for split, feats in monitor.last.items():
                features.store(final, cfg.dataset, split, AugmentParams(), feats, loop.precision)
    D.barrier()
    last = {k: v for k, v in history[-1].items() if k in ("loss", "inst_acc", "train_acc")}
    return dataclasses.replace(result, epochs_trained=len(history), **last)


def _cpu(state: dict) -> dict:
    """A state dict with contiguous CPU tensors (channels_last weights load anywhere)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _knn_monitor(backbone: nn.Module, cfg: Any, train) -> Callable[[int], dict[str, float]]:
    """An on_epoch_end hook: kNN top-1 of the backbone's features on the val split, every
    ``knn_every`` epochs and after the last, so the UI shows learning while it happens. It runs in
    eval mode (no BN statistics move, no random numbers drawn) so it cannot change the training."""
    every, epochs = cfg.pretrain.knn_every, cfg.pretrain.epochs
    precision = resolve_precision(cfg.pretrain.precision)
    val = load_split(cfg.dataset, "val")
    aug = AugmentParams()

    def monitor(epoch: int) -> dict[str, float]:
        if (epoch + 1) % every and epoch + 1 != epochs:
            return {}
        was = backbone.training
        backbone.eval()
        feats = {"train": extract(backbone, train.images, aug, precision=precision),
                 "val": extract(backbone, val.images, aug, precision=precision)}
        top1 = knn_top1(feats["train"], train.labels, feats["val"], val.labels, len(train.classes))
        backbone.train(was)
        monitor.last = feats if epoch + 1 == epochs else {}
        return {"knn_top1": top1}

    monitor.last = {}  # the features of the last epoch, kept for trainers/features.py's cache
    return monitor


def load_head(cfg: Any, ckpt: str | Path) -> nn.Module | None:
    """The pretrained projection head g (h → z) of the query/online encoder, on CPU, in eval mode;
    None for a method without one (its record's ``head_prefix``), or a checkpoint that holds none."""
    p = cfg.pretrain
    method = METHODS[p.method]
    model = checkpoint.load(ckpt).get("model")
    prefix = method.head_prefix
    if prefix is None or not model or not any(k.startswith(prefix) for k in model):
        return None
    h = p.config.head
    feat = build_backbone(cfg.backbone).feat_dim
    hidden = h.hidden_dim or (int(method.head_hidden_scale * feat) if method.head_hidden_scale else None)
    head, _ = build_head(h.kind, feat, hidden, h.out_dim, h.batchnorm)
    head.load_state_dict({k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)})
    return head.eval()


def load_backbone(cfg: Any, ckpt: str | Path) -> nn.Module:
    """The pretrained backbone f of a pretraining stage, on CPU, in eval mode."""
    backbone = build_backbone(cfg.backbone)
    backbone.load_state_dict(checkpoint.load(ckpt)["backbone"])
    return backbone.eval()

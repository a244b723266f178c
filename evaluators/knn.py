"""The ``knn`` evaluation stage: weighted kNN top-1 (trainers/neighbors.py) of the frozen backbone's
un-augmented features, the train split as the bank and the val split as queries, plus alignment
and uniformity on the val split (evaluators/geometry.py). No training, so it costs a few passes of
the backbone, and it needs no hyperparameter search: kNN is the monitor the InstDisc paper and
moco's CIFAR demo report, next to the linear probe.

Alignment's positive pairs are drawn with MoCo v2's aug-plus for every model, whatever augmentation
it was pretrained with, so the numbers compare across cells."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evaluators.geometry import measure
from trainers.augment import AugmentParams
from trainers.data import load_split
from trainers.features import frozen_features
from trainers.loop import device, prepare
from trainers.neighbors import knn_top1
from trainers.pretrain import load_backbone
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig


def knn(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone`` and ``cfg.knn``; ``upstream``: the pretraining
    stage's result (its ``checkpoint``). Its result's metrics: ``top1`` (percent), ``k``, ``T``, ``align`` and
    ``uniform`` (evaluators/geometry.py). Raises DataError (trainers/data.py) for unreadable data."""
    p = cfg.knn
    backbone = prepare(load_backbone(cfg, upstream.checkpoint), device())
    train, val = load_split(cfg.dataset, "train"), load_split(cfg.dataset, "val")
    aug = AugmentParams()
    with torch.no_grad():  # N×C features of each split
        feats = {split: frozen_features(backbone, data.images, upstream.checkpoint, cfg.dataset, split, aug)
                 for split, data in (("train", train), ("val", val))}
        top1 = knn_top1(feats["train"], train.labels, feats["val"], val.labels, len(train.classes), k=p.k, T=p.T)
    geo = measure(backbone, val.images, aug, cfg.dataset.image_size, plain=feats["val"])
    sink.log({"top1": top1, **geo}, step=0)
    sink.progress(1, 1)
    return EvalResult({"top1": top1, "k": p.k, "T": p.T, **geo})

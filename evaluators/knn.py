"""The ``knn`` evaluation stage: weighted kNN top-1 (trainers/knn.py) of the frozen backbone's
un-augmented features, the train split as the bank and the val split as queries, plus alignment
and uniformity on the val split (evaluators/geometry.py). No training, so it costs a few passes of
the backbone, and it needs no hyperparameter search: kNN is the monitor the InstDisc paper and
moco's CIFAR demo report, next to the linear probe.

Alignment's positive pairs are drawn with MoCo v2's aug-plus for every model, whatever augmentation
it was pretrained with, so the numbers compare across cells."""
from __future__ import annotations

from pathlib import Path

import torch

from evaluators.geometry import measure
from trainers.augment import AugmentParams
from trainers.data import load_split
from trainers.features import frozen_features
from trainers.knn import knn_top1
from trainers.loop import device, prepare
from trainers.pretrain import load_backbone
from trainers.sink import Sink


def knn(spec: dict, upstream: dict, workdir: Path, sink: Sink) -> dict:
    """spec: sections ``dataset``, ``backbone`` and ``knn``; upstream: the pretrain result."""
    p = spec["knn"]
    backbone = prepare(load_backbone(spec, upstream["checkpoint"]), device())
    train, val = load_split(spec["dataset"], "train"), load_split(spec["dataset"], "val")
    aug = AugmentParams()
    with torch.no_grad():
        feats = {split: frozen_features(backbone, data.images, upstream["checkpoint"], spec["dataset"], split, aug)
                 for split, data in (("train", train), ("val", val))}
        top1 = knn_top1(feats["train"], train.labels, feats["val"], val.labels, len(train.classes), k=p["k"], T=p["T"])
    geo = measure(backbone, val.images, aug, spec["dataset"]["image_size"], plain=feats["val"])
    sink.log({"top1": top1, **geo}, step=0)
    sink.progress(1, 1)
    return {"top1": top1, "k": p["k"], "T": p["T"], **geo}

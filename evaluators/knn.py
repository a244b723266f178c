"""The ``knn`` evaluation stage: weighted kNN top-1 (trainers/neighbors.py) of the frozen backbone's
un-augmented features, the train split as the bank and the val split as queries, plus alignment
and uniformity on the val split (evaluators/geometry.py). No training, so it costs a few passes of
the backbone, and it needs no hyperparameter search: kNN is the monitor the InstDisc paper and
moco's CIFAR demo report, next to the linear probe.

The headline ``top1`` is at ``knn.k`` (200, InstDisc's ImageNet setting, ~1,300 images per class);
``knn.more_k`` adds ``top1_k<k>`` from the same search. When a k exceeds the smallest class's
training images, most of that vote is other classes whatever the features (a 10-class set of ~144
images per class gave 17.5% at k 200, 36.7% at k 5, 83.1% by the linear probe), so the stage warns.

Alignment's positive pairs are drawn with MoCo v2's aug-plus for every model, whatever augmentation
it was pretrained with, so the numbers compare across cells."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evaluators.geometry import measure
from trainers.augment import AugmentParams
from trainers.data import load_split
from trainers.features import frozen_features
from trainers.loop import device, prepare
from trainers.neighbors import knn_accuracies
from trainers.pretrain import load_backbone
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig
    from pipeline.stages import KnnSpec


def knn_metrics(spec: KnnSpec) -> dict[str, int]:
    """Metric name → its k: ``top1`` at ``spec.k``, then ``top1_k<k>`` for each of ``spec.more_k``."""
    return {"top1": spec.k, **{f"top1_k{k}": k for k in spec.more_k}}


def class_sizes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The train split's labels N (int64) → training images of each class, num_classes (int64)."""
    return torch.bincount(labels.cpu(), minlength=num_classes)


def small_class_warning(metrics: dict[str, int], sizes: torch.Tensor, classes: Sequence[str]) -> str | None:
    """A warning when a k of ``metrics`` (name → k) exceeds the training images of the smallest
    class (``sizes``: ``class_sizes``, one count per class of ``classes``), naming the k, the class
    size and the metric to read instead (the largest k that fits); None when every k fits."""
    size, smallest = int(sizes.min()), int(sizes.argmin())
    over = {name: k for name, k in metrics.items() if k > size}
    if not over:
        return None
    fits = [(k, name) for name, k in metrics.items() if k <= size]
    if fits:
        k, name = max(fits)
        instead = f"read {name} (k = {k}) instead"
    elif size:
        instead = f"set knn.more_k to [{min(20, size)}] (at most {size}) and read top1_k{min(20, size)}"
    else:
        instead = "no k can be read fairly: a class without training images is never voted for"
    named = " and ".join(f"{k} ({name})" for name, k in over.items())
    verb = "exceeds" if len(over) == 1 else "exceed"
    return (f"knn: k = {named} {verb} the {size} training images of the smallest class ({classes[smallest]!r}), "
            f"so most of the vote is other classes; {instead}")


def knn(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone`` and ``cfg.knn``; ``upstream``: the pretraining
    stage's result (its ``checkpoint``). Its result's metrics: ``top1`` at ``k`` and ``top1_k<k>``
    for each of ``more_k`` (percent, one similarity search), ``k``, ``T``, ``smallest_class`` (training
    images of the smallest class), ``val_images`` (the queries top-1 is counted on: its resolution is
    100 / val_images points), ``align`` and ``uniform`` (evaluators/geometry.py); ``more_k``
    (the list) is in its info. Warns through ``sink`` when a k exceeds the smallest class. Raises
    DataError (trainers/data.py) for unreadable data."""
    p = cfg.knn
    backbone = prepare(load_backbone(cfg, upstream.checkpoint), device())
    train, val = load_split(cfg.dataset, "train"), load_split(cfg.dataset, "val")
    metrics, sizes = knn_metrics(p), class_sizes(train.labels, len(train.classes))
    warning = small_class_warning(metrics, sizes, train.classes)
    if warning:
        sink.warn(warning)
    aug = AugmentParams()
    with torch.no_grad():  # N×C features of each split
        feats = {split: frozen_features(backbone, data.images, upstream.checkpoint, cfg.dataset, split, aug)
                 for split, data in (("train", train), ("val", val))}
        acc = knn_accuracies(feats["train"], train.labels, feats["val"], val.labels, len(train.classes),
                             list(metrics.values()), T=p.T)  # k → percent
    top1 = {name: acc[k] for name, k in metrics.items()}
    geo = measure(backbone, val.images, aug, cfg.dataset.image_size, plain=feats["val"])
    # top-1's resolution is one val image (100 / val_images points): the report needs it to tell a tie
    sink.log({**top1, **geo, "val_images": float(len(val))}, step=0)
    sink.progress(1, 1)
    return EvalResult.of({**top1, "k": p.k, "more_k": list(p.more_k), "T": p.T, "smallest_class": int(sizes.min()),
                          "val_images": len(val), **geo})

"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, InstDisc;
k=200, T=0.1 as in lemniscate.pytorch and the moco CIFAR demo's monitor).

Each query's k most similar training features vote for their labels with weight exp(s/T), where s
is the cosine similarity; the class with the largest total wins. Used by the online monitor during
pretraining and by the ``knn`` evaluation stage (evaluators/knn.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers import distributed as D
from trainers.augment import AugmentParams, eval_view
from trainers.data import LazyImages, _load_image
from trainers.loader import Shard, default_workers
from trainers.loop import autocast


class _EvalFiles(torch.utils.data.Dataset):
    """File i in the evaluation view (trainers/data.py ``_load_image``), for DataLoader workers."""

    def __init__(self, images: LazyImages, start: int, stop: int):
        self.files, self.size, self.native, self.start, self.stop = (images.files, images.image_size, images.native,
                                                                     start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(_load_image(self.files[self.start + i], self.size, self.native)).permute(2, 0, 1)


def _shard_batches(images, start: int, stop: int, batch: int, dev: torch.device, workers: int | None):
    if isinstance(images, LazyImages):  # decoded by DataLoader workers, ahead of the backbone
        workers = default_workers() if workers is None else workers
        loader = torch.utils.data.DataLoader(_EvalFiles(images, start, stop), batch_size=batch, num_workers=workers,
                                             pin_memory=dev.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        yield from loader
    else:
        for i in range(start, stop, batch):
            yield images[i:min(i + batch, stop)]


@torch.no_grad()
def extract(backbone: nn.Module, images, aug: AugmentParams, batch: int = 512, precision: str = "fp32",
            workers: int | None = None) -> torch.Tensor:
    """Backbone features h (N×C float32, on the CPU) of uint8 images (N×3×S×S tensor, or a
    LazyImages decoded in the evaluation view by DataLoader workers), un-augmented, batch by batch on
    the backbone's device, under ``precision``'s autocast. Under torch.distributed every rank
    extracts a contiguous share and all get the whole result. The caller sets train/eval mode."""
    dev = next(backbone.parameters()).device
    n = len(images)
    shard = Shard.of(n)
    out = []
    for x in _shard_batches(images, shard.start, shard.stop, batch, dev, workers):
        x = eval_view(x.to(dev, non_blocking=True), aug)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision):
            out.append(backbone(x).float())
    feats = torch.cat(out) if out else torch.zeros((0, _feat_dim(backbone)), device=dev)
    return D.gather_shards(feats, n).cpu()


def _feat_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "feat_dim"))


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, T: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """train_feats N×C, train_labels N, queries M×C (any norm) → predicted labels M."""
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[i:i + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # m×k
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], (sim / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu()


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, k: int = 200, T: float = 0.1) -> float:
    pred = knn_predict(train_feats, train_labels, val_feats, num_classes, k, T)
    return 100.0 * float((pred == val_labels.cpu()).float().mean())

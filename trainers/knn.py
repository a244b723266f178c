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

from trainers.augment import AugmentParams, eval_view


@torch.no_grad()
def extract(backbone: nn.Module, images: torch.Tensor, aug: AugmentParams, batch: int = 512) -> torch.Tensor:
    """Backbone features h of uint8 images, un-augmented, batch by batch, on the backbone's device;
    returned on the CPU. The caller sets train/eval mode."""
    dev = next(backbone.parameters()).device
    out = [backbone(eval_view(images[i:i + batch].to(dev), aug)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


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

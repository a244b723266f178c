"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, InstDisc;
k=200, T=0.1 as in lemniscate.pytorch and the moco CIFAR demo's monitor).

Each query's k most similar training features vote for their labels with weight exp(s/T), where s
is the cosine similarity; the class with the largest total wins. Several k come from one search:
the top-max(k) neighbours are found once, sorted by similarity, and each k's vote reads the first k
of them. Used by the online monitor during pretraining and by the ``knn`` evaluation stage
(evaluators/knn.py); the features come from trainers/features.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predictions(train_feats: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
                    num_classes: int, ks: Sequence[int], T: float = 0.1, chunk: int = 1024
                    ) -> dict[int, torch.Tensor]:
    """train_feats N×C, train_labels N (int64 in [0, num_classes)), queries M×C (any norm) → for
    each k of ``ks`` (each >= 1), the predicted labels M (int64, on the CPU), from one similarity
    search of the top-max(ks) neighbours. A k above N votes with all N. Queries are scored
    ``chunk`` rows at a time (an M×N similarity matrix never exists whole)."""
    bank = F.normalize(train_feats.float(), dim=1)  # N×C
    labels = train_labels.to(bank.device)  # N
    ks = list(dict.fromkeys(ks))
    top = min(max(ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for i in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[i:i + chunk].float().to(bank.device), dim=1)  # m×C
        sim, idx = (q @ bank.T).topk(top, dim=1)  # m×top, most similar first
        weight, voter = (sim / T).exp(), labels[idx]  # m×top each
        for k in ks:
            n = min(k, top)
            votes = torch.zeros(q.shape[0], num_classes, device=bank.device)  # m×classes
            votes.scatter_add_(1, voter[:, :n], weight[:, :n])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(p).cpu() for k, p in preds.items()}


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, T: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """``knn_predictions`` at one k: train_feats N×C, train_labels N, queries M×C → labels M."""
    return knn_predictions(train_feats, train_labels, queries, num_classes, (k,), T, chunk)[k]


def knn_accuracies(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                   val_labels: torch.Tensor, num_classes: int, ks: Sequence[int], T: float = 0.1
                   ) -> dict[int, float]:
    """Top-1 accuracy in percent (0–100) of ``knn_predictions`` at each k of ``ks`` for val_feats
    M×C against val_labels M, from one similarity search."""
    preds = knn_predictions(train_feats, train_labels, val_feats, num_classes, ks, T)
    return {k: 100.0 * float((p == val_labels.cpu()).float().mean()) for k, p in preds.items()}


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, k: int = 200, T: float = 0.1) -> float:
    """Top-1 accuracy in percent (0–100) of ``knn_predict`` for val_feats M×C against val_labels M."""
    return knn_accuracies(train_feats, train_labels, val_feats, val_labels, num_classes, (k,), T)[k]

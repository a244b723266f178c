"""Weighted k-nearest-neighbour classification on L2-normalised features (Wu et al. 2018, InstDisc;
k=200, T=0.1 as in lemniscate.pytorch and the moco CIFAR demo's monitor).

Each query's k most similar training features vote for their labels with weight exp(s/T), where s
is the cosine similarity; the class with the largest total wins. Used by the online monitor during
pretraining and by the ``knn`` evaluation stage (evaluators/knn.py); the features come from
trainers/features.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, T: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """train_feats N×C, train_labels N (int64 in [0, num_classes)), queries M×C (any norm) →
    predicted labels M (int64, on the CPU). k is capped at N; queries are scored ``chunk`` rows at a
    time (an M×N similarity matrix never exists whole)."""
    bank = F.normalize(train_feats.float(), dim=1)  # N×C
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[i:i + chunk].float().to(bank.device), dim=1)  # m×C
        sim, idx = (q @ bank.T).topk(k, dim=1)  # m×k
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)  # m×classes
        votes.scatter_add_(1, labels[idx], (sim / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu()


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, k: int = 200, T: float = 0.1) -> float:
    """Top-1 accuracy in percent (0–100) of ``knn_predict`` for val_feats M×C against val_labels M."""
    pred = knn_predict(train_feats, train_labels, val_feats, num_classes, k, T)
    return 100.0 * float((pred == val_labels.cpu()).float().mean())

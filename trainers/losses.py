"""Contrastive losses, each checked against a naive per-sample version in tests/unit."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of MoCo (He et al. 2020, eq. 1; moco/builder.py ``forward``).

    q: N×C queries, k: N×C positive keys, negatives: C×K, all L2-normalised. Returns (loss, logits)
    where logits is N×(1+K) with the positive in column 0.
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: N×1
    l_neg = torch.einsum("nc,ck->nk", q, negatives)  # negative logits: N×K
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # N×(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives are the 0-th
    return F.cross_entropy(logits, labels), logits

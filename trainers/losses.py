"""Contrastive and predictive losses, each checked against a naive per-sample version in tests/unit."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of MoCo (He et al. 2020, eq. 1; moco/builder.py ``forward``).

    q: N×C queries, k: N×C positive keys, negatives: C×K, all L2-normalised. Returns (loss, logits)
    where logits is N×(1+K) with the positive in column 0.
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: N×1
    l_neg = torch.einsum("nc,ck->nk", q, negatives)  # negative logits: N×K
    return _ce_first(l_pos, l_neg, T)


def info_nce_selected(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, index: torch.Tensor, T: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE where query n sees the negatives ``negatives[:, index[n]]`` (index: N×K', repeats allowed),
    without materialising an N×C×K' tensor."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N×1
    l_neg = (q @ negatives).gather(1, index)  # N×K'
    return _ce_first(l_pos, l_neg, T)


def _ce_first(l_pos: torch.Tensor, l_neg: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # N×(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives are the 0-th
    return F.cross_entropy(logits, labels), logits


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent (Chen et al. 2020a, eq. 1) over the 2N views of a batch: each view's positive
    is its other view, its 2N-2 negatives the rest of the batch. z1, z2: N×C, L2-normalised.
    Returns (loss averaged over the 2N anchors, logits 2N×2N with the diagonal masked)."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], 0)  # 2N×C
    logits = z @ z.T / T  # 2N×2N
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets), logits


def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): 2 − 2·cos(p, z'), averaged over the batch.
    The target is detached: no gradient reaches the target network."""
    return (2 - 2 * F.cosine_similarity(p, z_target.detach(), dim=1)).mean()


def nce_memory_bank(pos: torch.Tensor, neg: torch.Tensor, T: float, Z: float, n_data: int) -> torch.Tensor:
    """InstDisc's NCE loss (Wu et al. 2018, eq. 6-7; lemniscate.pytorch NCEAverage/NCECriterion).

    pos: N dot products v·f_i with the instance's own memory entry; neg: N×K dot products with K
    entries drawn uniformly from a bank of ``n_data``. P(i|v) = exp(v·f/T)/Z; noise P_n = 1/n_data.
    h = P/(P + K·P_n) for data, and the loss is −E[log h(data)] − K·E[log(1 − h(noise))].
    """
    k = neg.shape[1]
    pn = 1.0 / n_data
    p_pos = torch.exp(pos / T) / Z
    p_neg = torch.exp(neg / T) / Z
    log_h_pos = torch.log(p_pos / (p_pos + k * pn))
    log_1m_h_neg = torch.log((k * pn) / (p_neg + k * pn))
    return -(log_h_pos + log_1m_h_neg.sum(1)).mean()


def byol_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL's target decay τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2, rising from τ_base to 1."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1) / 2

"""Contrastive and predictive losses, each checked against a naive per-sample version in tests/unit.

Every loss runs in fp32 with autocast off (``in_fp32``), whatever the training precision: logits/T
at T = 0.07 and 65,536 negatives lose too much in bf16's 8-bit mantissa."""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F


def top1(logits: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
    """Fraction of rows of ``logits`` (N×C) whose largest logit is ``target`` (an index, or N
    indices), as a device tensor: nothing is read back to the host."""
    return (logits.argmax(1) == target).float().mean()


@contextlib.contextmanager
def full_precision():
    """Autocast off on every device type present, for the enclosed computation."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def in_fp32(fn):
    """Run ``fn`` with autocast off and its floating-point tensor arguments cast to fp32."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with full_precision():
            return fn(*cast, **kwargs)
    return wrapper


@in_fp32
def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of MoCo (He et al. 2020, eq. 1; moco/builder.py ``forward``).

    q: N×C queries, k: N×C positive keys, negatives: C×K, all L2-normalised. Returns (loss, logits)
    where logits is N×(1+K) with the positive in column 0.
    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: N×1
    l_neg = torch.einsum("nc,ck->nk", q, negatives)  # negative logits: N×K
    return _ce_first(l_pos, l_neg, T)


@in_fp32
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


@in_fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent (Chen et al. 2020a, eq. 1) over the 2N views of a batch: each view's positive
    is its other view, its 2N-2 negatives the rest of the batch. z1, z2: N×C, L2-normalised.
    Returns (loss averaged over the 2N anchors, logits 2N×2N with the diagonal masked)."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], 0)  # 2N×C
    logits = z @ z.T / T  # 2N×2N
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n, device=z.device), torch.arange(0, n, device=z.device)])
    return F.cross_entropy(logits, targets), logits


@in_fp32
def nt_xent_rows(a1: torch.Tensor, a2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, rows: torch.Tensor,
                 T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent for some anchors of a larger batch (data-parallel SimCLR): a1, a2 are b×C anchors
    (this rank's rows), z1, z2 the whole batch's B×C views (gathered with gradient), ``rows`` (b)
    the anchors' rows in it. Returns (loss over the 2b anchors, logits 2b×2B with self masked).
    With rows = 0..B−1 and a = z it is ``nt_xent`` exactly."""
    big_b = z1.shape[0]
    anchors = torch.cat([a1, a2], 0)  # 2b×C
    logits = anchors @ torch.cat([z1, z2], 0).T / T  # 2b×2B
    own = torch.cat([rows, rows + big_b])
    logits = logits.masked_fill(F.one_hot(own, 2 * big_b).bool(), float("-inf"))
    targets = torch.cat([rows + big_b, rows])
    return F.cross_entropy(logits, targets), logits


@in_fp32
def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): 2 − 2·cos(p, z'), averaged over the batch.
    The target is detached: no gradient reaches the target network."""
    return (2 - 2 * F.cosine_similarity(p, z_target.detach(), dim=1)).mean()


@in_fp32
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

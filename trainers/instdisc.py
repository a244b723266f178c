"""Instance discrimination with a memory bank (Wu et al. 2018), after zhirongw/lemniscate.pytorch@f7cfe29:
one view per image; the bank holds an L2-normalised embedding of every training image; K negatives
are drawn uniformly from it for every sample; the loss is NCE (``nce``) or the softmax over
1 + K entries (``softmax``, the README's updated model); the bank entry of each seen image moves
towards its new embedding with momentum ``bank_m`` (0.5) and is renormalised."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers import distributed as D
from trainers.losses import nce_memory_bank


class InstDisc(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, n_data: int, K: int = 4096, T: float = 0.07,
                 bank_m: float = 0.5, loss: str = "nce"):
        super().__init__()
        self.encoder, self.K, self.T, self.bank_m, self.loss = encoder, K, T, bank_m, loss
        stdv = 1.0 / math.sqrt(dim / 3)  # lemniscate's init of the bank
        self.register_buffer("memory", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))  # N_data×C
        self.register_buffer("Z", torch.tensor(-1.0))  # NCE normaliser, estimated on the first batch

    @torch.no_grad()
    def _update_memory(self, v: torch.Tensor, idx: torch.Tensor) -> None:
        self.memory[idx] = F.normalize(self.bank_m * self.memory[idx] + (1 - self.bank_m) * v, dim=1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x: one view of the global batch B×3×H×W; idx: the images' dataset indices (B). Returns
        (loss, logits b×(1+K)) for this rank's b = B / world rows."""
        v = F.normalize(self.encoder(D.local(x)), dim=1)  # b×C
        n = v.shape[0]
        neg_idx = D.local(torch.randint(self.memory.shape[0], (idx.shape[0], self.K), generator=g)).to(v.device)  # b×K
        with torch.no_grad():
            w_pos = self.memory[D.local(idx)]  # b×C
            w_neg = self.memory[neg_idx]  # N×K×C
        pos = (v * w_pos).sum(1)  # N
        neg = torch.einsum("nc,nkc->nk", v, w_neg)  # N×K
        logits = torch.cat([pos[:, None], neg], 1)
        if self.loss == "softmax":
            loss = F.cross_entropy(logits / self.T, torch.zeros(n, dtype=torch.long, device=v.device))
        else:
            if self.Z < 0:  # lemniscate: Z = mean(exp(s/T)) · N_data, once
                self.Z.fill_(D.mean(float(torch.exp(logits.detach() / self.T).mean())) * self.memory.shape[0])
            loss = nce_memory_bank(pos, neg, self.T, float(self.Z), self.memory.shape[0])
        # every rank writes every rank's embeddings: the banks stay equal (lemniscate has one process)
        self._update_memory(D.gather(v.detach()), idx)
        return loss, logits

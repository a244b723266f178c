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
from trainers.augment import to_device
from trainers.losses import full_precision, nce_memory_bank


class InstDisc(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, n_data: int, K: int = 4096, T: float = 0.07,
                 bank_m: float = 0.5, loss: str = "nce"):
        super().__init__()
        self.encoder, self.K, self.T, self.bank_m, self.loss = encoder, K, T, bank_m, loss
        stdv = 1.0 / math.sqrt(dim / 3)  # lemniscate's init of the bank
        self.register_buffer("memory", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))  # N_data×C
        self.register_buffer("Z", torch.tensor(-1.0))  # NCE normaliser, estimated on the first batch
        self._z_ready = False

    def _load_from_state_dict(self, *args, **kwargs):  # a resumed Z is read again
        self._z_ready = False
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _update_memory(self, v: torch.Tensor, idx: torch.Tensor) -> None:
        self.memory[idx] = F.normalize(self.bank_m * self.memory[idx] + (1 - self.bank_m) * v, dim=1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x: one view of this rank's b rows of the global batch (B = b·W), b×3×H×W; idx: their
        dataset indices (b). Returns (loss, logits b×(1+K)), in fp32."""
        v = F.normalize(self.encoder(x).float(), dim=1)  # b×C
        n = v.shape[0]
        big_b = n * D.world().size
        neg_idx = D.local(torch.randint(self.memory.shape[0], (big_b, self.K), generator=g))  # b×K, global draw
        neg_idx = to_device(neg_idx, v.device)
        with torch.no_grad():
            w_pos = self.memory[idx]  # b×C
            w_neg = self.memory[neg_idx]  # b×K×C
        with full_precision():  # dot products and logits in fp32 (trainers/losses.py)
            pos = (v * w_pos).sum(1)  # b
            neg = torch.einsum("nc,nkc->nk", v, w_neg)  # b×K
        logits = torch.cat([pos[:, None], neg], 1)
        if self.loss == "softmax":
            with full_precision():
                loss = F.cross_entropy(logits / self.T, torch.zeros(n, dtype=torch.long, device=v.device))
        else:
            if not self._z_ready:
                if bool(self.Z < 0):  # lemniscate: Z = mean(exp(s/T)) · N_data, once (one read-back per run)
                    self.Z.copy_(D.all_mean(torch.exp(logits.detach() / self.T).mean()) * self.memory.shape[0])
                self._z_ready = True
            loss = nce_memory_bank(pos, neg, self.T, self.Z, self.memory.shape[0])
        # every rank writes every rank's embeddings: the banks stay equal (lemniscate has one process)
        self._update_memory(D.gather(v.detach()), D.gather(idx))
        return loss, logits

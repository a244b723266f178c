"""SimCLR (Chen et al. 2020a), after google-research/simclr@be133b3: two views, in-batch negatives
(K = 2B − 2), NT-Xent, a projection head with BN. Its optimiser (LARS in the preset) is
trainers/optim.py's, chosen by the grid."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers import distributed as D
from trainers.losses import nt_xent, nt_xent_rows


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, T: float = 0.1):
        super().__init__()
        self.encoder, self.T = encoder, T

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x1, x2: two views of this rank's b rows, b×3×H×W. Returns (loss, logits 2b×2B): each
        anchor is contrasted with all 2B − 2 other views of the global batch (gathered with
        gradient under torch.distributed, as SimCLR's TPU code gathers across cores)."""
        z1 = F.normalize(self.encoder(x1).float(), dim=1)  # b×C
        z2 = F.normalize(self.encoder(x2).float(), dim=1)  # b×C
        w = D.world()
        if w.size == 1:
            return nt_xent(z1, z2, self.T)
        rows = torch.arange(z1.shape[0], device=z1.device) * w.size + w.rank  # this rank's rows (interleaved)
        return nt_xent_rows(z1, z2, D.gather_with_grad(z1), D.gather_with_grad(z2), rows, self.T)

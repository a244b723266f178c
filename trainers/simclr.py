"""SimCLR (Chen et al. 2020a), after google-research/simclr@be133b3: two views, in-batch negatives
(K = 2B − 2), NT-Xent, a projection head with BN. Its optimiser (LARS in the preset) is
trainers/optim.py's, chosen by the grid."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.losses import nt_xent


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, T: float = 0.1):
        super().__init__()
        self.encoder, self.T = encoder, T

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = F.normalize(self.encoder(x1), dim=1)  # N×C
        z2 = F.normalize(self.encoder(x2), dim=1)  # N×C
        return nt_xent(z1, z2, self.T)

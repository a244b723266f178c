"""BYOL (Grill et al. 2020), after deepmind-research/byol@4822a45: an online network (backbone,
projector, predictor) regresses a target network (backbone, projector) that is an EMA of it, with
τ rising from τ_base to 1 by cosine. No negatives. The two views' losses are symmetrised.

The target is updated at the start of each forward with the τ of that step, as moco updates its key
encoder; the step counter is a buffer, so a resumed run continues the τ schedule."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from trainers.losses import byol_loss, byol_tau


class BYOL(nn.Module):
    def __init__(self, online: nn.Module, predictor: nn.Module, tau_base: float, total_steps: int):
        super().__init__()
        self.online, self.predictor = online, predictor
        self.target = copy.deepcopy(online)
        self.target.requires_grad_(False)
        self.tau_base, self.total_steps = tau_base, total_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_target(self) -> None:
        tau = byol_tau(int(self.step), self.total_steps, self.tau_base)
        for p_o, p_t in zip(self.online.parameters(), self.target.parameters()):
            p_t.mul_(tau).add_(p_o.detach(), alpha=1 - tau)
        self.step += 1

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self._update_target()
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))  # N×C each
        with torch.no_grad():
            t1, t2 = self.target(x1), self.target(x2)  # N×C each
        return byol_loss(p1, t2) + byol_loss(p2, t1)

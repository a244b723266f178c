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
        self._step: int | None = None  # the step mirrored on the host, so no step reads it back

    def _load_from_state_dict(self, *args, **kwargs):
        self._step = None
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _update_target(self) -> None:
        if self._step is None:
            self._step = int(self.step)  # once per run
        tau = byol_tau(self._step, self.total_steps, self.tau_base)
        t_params = list(self.target.parameters())
        torch._foreach_mul_(t_params, tau)
        torch._foreach_add_(t_params, [p.detach() for p in self.online.parameters()], alpha=1 - tau)
        self._step += 1
        self.step.fill_(self._step)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self._update_target()
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))  # N×C each
        with torch.no_grad():
            t1, t2 = self.target(x1), self.target(x2)  # N×C each
        return byol_loss(p1, t2) + byol_loss(p2, t1)

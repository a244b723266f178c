"""Optimisers for pretraining: SGD (MoCo) and LARS (SimCLR, BYOL), with BN and bias optionally
excluded from weight decay and from LARS's layer adaptation.

LARS (You et al. 2017) as google-research/simclr's ``lars_optimizer.py`` applies it, per tensor w
with gradient g, learning rate lr, momentum m and trust coefficient η (``eeta``, 1e-3):

    d = g + wd·w                                   (unless w is excluded from weight decay)
    r = η·‖w‖/‖d‖ if ‖w‖ > 0 and ‖d‖ > 0 else 1   (1 for a tensor excluded from adaptation)
    v ← m·v + lr·r·d
    w ← w − v

The learning rate is inside the momentum buffer, as in SimCLR's code (torch's SGD keeps it outside).
SimCLR excludes ``batch_normalization`` and ``bias`` variables by name, and BYOL its BN and bias
parameters; here a tensor with at most one dimension is excluded, which selects the same tensors in
every backbone and head of trainers/ (convolutions have no bias; fc biases and BN's affine
parameters are 1-D).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from trainers.names import OPTIMIZERS  # re-exported: the choices live where grids are validated without torch


def is_bias_or_norm(p: torch.Tensor) -> bool:
    return p.ndim <= 1


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling. Each param group may set ``exclude`` (bool): its tensors then
    get neither weight decay nor the trust ratio (SimCLR's ``exclude_from_weight_decay``, which its
    ``exclude_from_layer_adaptation`` defaults to). ``state_dict`` holds the momentum buffers, so a
    resumed run continues exactly."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: lr {lr}, momentum {momentum}, weight_decay {weight_decay} must be >= 0 "
                             f"and eta {eta} > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            if group["exclude"]:
                d = grads
            else:
                d = torch._foreach_add(grads, params, alpha=wd) if wd else grads
                w_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                ratio = list(torch.unbind(torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                                      torch.ones_like(w_norm))))
                if wd:  # d is our own copy: scale it in place
                    torch._foreach_mul_(d, ratio)
                else:  # d is the gradients: leave them as backward() wrote them
                    d = torch._foreach_mul(d, ratio)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, d, alpha=lr)
            torch._foreach_sub_(params, bufs)
        return loss


def build_optimizer(params: Iterable[nn.Parameter], kind: str, lr: float, momentum: float, weight_decay: float,
                    exclude_bias_norm: bool = False, lars_eta: float = 1e-3) -> torch.optim.Optimizer:
    """``kind`` is "sgd" (torch's, MoCo's recipe) or "lars". With ``exclude_bias_norm`` the 1-D tensors
    (biases, BN weights) form a group without weight decay, and for LARS without adaptation."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}: use one of {', '.join(OPTIMIZERS)}")
    params = [p for p in params if p.requires_grad]
    groups = [{"params": params}]
    if exclude_bias_norm:
        free = {"params": [p for p in params if is_bias_or_norm(p)], "weight_decay": 0.0}
        if kind == "lars":
            free["exclude"] = True
        groups = [g for g in ({"params": [p for p in params if not is_bias_or_norm(p)]}, free) if g["params"]]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)

"""Learning-rate schedules, evaluated per optimisation step.

- ``cosine``: lr·½(1 + cos(π·t)), t the fraction of training done (moco ``--cos``; SimCLR/BYOL after warmup).
- ``step``: lr·0.1^(number of milestones passed) (moco v1: epochs 120 and 160 of 200).
Both with an optional linear warmup over the first ``warmup_epochs`` (SimCLR and BYOL use 10).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, kind: str,
          milestones: Sequence[int] = (), warmup_epochs: float = 0.0, gamma: float = 0.1) -> float:
    epoch = step / steps_per_epoch
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * (step + 1) / (warmup_epochs * steps_per_epoch)
    if kind == "cosine":
        t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if kind == "step":
        return base_lr * gamma ** sum(epoch >= m for m in milestones)
    if kind == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {kind!r}")

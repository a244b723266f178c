"""The supervised baseline's model (the paper's Table 2): backbone + fc, trained by cross-entropy."""
from __future__ import annotations

import torch
import torch.nn as nn


class Supervised(nn.Module):
    """backbone f followed by Linear(feat_dim, num_classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))  # logits: N×classes

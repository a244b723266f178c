"""Projection heads g: h → z (Table 1 of Appalaraju et al., arXiv 2012.00868).

- ``none``: z = h ("without projection head", Table 1a).
- ``linear``: one fc to ``out_dim`` (MoCo v1's head, moco/builder.py without ``--mlp``).
- ``mlp``: fc–ReLU–fc, hidden = feat_dim (MoCo v2: Linear(2048,2048)–ReLU–Linear(2048,128), no BN).
- ``frozen``: the mlp, initialised from U(-a, a) with a = 1/sqrt(fan_in) and never trained
  (Table 1b: "initialize ... with a uniform distribution and freeze its parameters").
- ``deep``: fc–ReLU–fc–ReLU–fc (Table 1c).
- ``narrow``: fc–ReLU–fc with the hidden width cut to ``out_dim`` (Table 1d: "2048 → 128").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainers.names import HEADS  # re-exported: the choices live where grids are validated without torch


def _bn(on: bool, dim: int) -> list[nn.Module]:
    return [nn.BatchNorm1d(dim)] if on else []


def build_head(kind: str, feat_dim: int, hidden_dim: int | None, out_dim: int, batchnorm: bool = False
               ) -> tuple[nn.Module, int]:
    """Return (head, output dimension). ``batchnorm`` puts BN after each hidden fc, as SimCLR's
    head does (google-research/simclr model_util.py) and MoCo v2's does not."""
    hidden = hidden_dim or feat_dim
    if kind == "none":
        return nn.Identity(), feat_dim
    if kind == "linear":
        return nn.Linear(feat_dim, out_dim), out_dim
    if kind in ("mlp", "frozen"):
        head = nn.Sequential(nn.Linear(feat_dim, hidden), *_bn(batchnorm, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out_dim))
        if kind == "frozen":
            for layer in head:
                if isinstance(layer, nn.Linear):
                    a = 1.0 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.weight, -a, a)
                    nn.init.uniform_(layer.bias, -a, a)
            head.requires_grad_(False)
        return head, out_dim
    if kind == "deep":
        return nn.Sequential(nn.Linear(feat_dim, hidden), *_bn(batchnorm, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), *_bn(batchnorm, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, out_dim)), out_dim
    if kind == "narrow":
        return nn.Sequential(nn.Linear(feat_dim, out_dim), *_bn(batchnorm, out_dim), nn.ReLU(inplace=True),
                             nn.Linear(out_dim, out_dim)), out_dim
    raise ValueError(f"unknown head {kind!r}")


class Encoder(nn.Module):
    """backbone f (image → h) followed by projection head g (h → z)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # z: N×out_dim


def build_encoder(backbone: nn.Module, head, hidden: int | None = None) -> tuple[Encoder, int]:
    """(backbone + the head of spec ``head`` (trainers/methods/base.py HeadSpec), z's dimension).
    ``hidden``: the hidden width when ``head.hidden_dim`` is unset (default: the feature width)."""
    g, dim = build_head(head.kind, backbone.feat_dim, head.hidden_dim or hidden, head.out_dim, head.batchnorm)
    return Encoder(backbone, g), dim

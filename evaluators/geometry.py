"""Alignment and uniformity of the representation (Wang & Isola, ICML 2020, cited by the paper).

On the L2-normalised backbone features h of the val split:
- alignment = E ||f(x) − f(x')||² over two augmented views x, x' of the same image, drawn with the
  pretraining's own augmentation (lower: positives closer);
- uniformity = log E exp(−2 ||f(x) − f(y)||²) over pairs of different images, un-augmented (lower:
  features spread more evenly over the sphere).
Both use the paper's defaults α = 2, t = 2. They are cheap (two passes over the val split) and
computed after every pretraining, random init included.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.augment import AugmentParams, augment
from trainers.features import extract


def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = 2.0) -> float:
    """a, b: N×C normalised features of positive pairs (row i of a with row i of b)."""
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """x: N×C normalised features; over all N(N−1)/2 distinct pairs."""
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


@torch.no_grad()
def measure(backbone: nn.Module, images: torch.Tensor, aug: AugmentParams, size: int, seed: int = 0,
            batch: int = 512, plain: torch.Tensor | None = None) -> dict[str, float]:
    """Alignment of two aug-plus views of ``images``; uniformity of their un-augmented features
    (``plain``, when the caller already has them)."""
    backbone.eval()
    dev = next(backbone.parameters()).device
    g = torch.Generator().manual_seed(seed)
    views = []
    for _ in range(2):
        views.append(torch.cat([F.normalize(backbone(augment(images[i:i + batch].to(dev), aug, size, g)).float(), dim=1)
                                .cpu() for i in range(0, len(images), batch)]))
    plain = F.normalize(extract(backbone, images, aug, batch) if plain is None else plain, dim=1)
    return {"align": alignment(views[0], views[1]), "uniform": uniformity(plain)}

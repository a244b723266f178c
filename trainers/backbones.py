"""Backbones that map an image batch to pooled features h (N×feat_dim).

- ``tiny_resnet``: a CIFAR-style ResNet (3×3 stem, no max-pool, one BasicBlock per stage, widths
  32/64/128/256, 1.2 M parameters) for 32-px data on CPU.
- ``resnet18`` / ``resnet50``: torchvision's, with ``fc`` removed. ``cifar_stem: true`` swaps the
  7×7/2 stem and max-pool for a 3×3/1 conv, as moco's CIFAR demo does.

``bn_splits > 1`` replaces every BatchNorm by :class:`SplitBatchNorm2d`, which normalises each of
``bn_splits`` sub-batches with its own statistics during training. moco's CIFAR demo
(colab/moco_cifar10_demo.ipynb, SplitBatchNorm) uses it to emulate multi-GPU shuffle-BN on one
device: without it, a model can tell the positive key from the negatives through batch statistics.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.spec import BackboneSpec


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``num_splits`` equal sub-batches."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"batch {n} is not divisible by bn_splits={self.num_splits}")
        s = self.num_splits
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        # (N, C, H, W) → (N/S, S·C, H, W): each sub-batch gets its own channel statistics (reshape:
        # a channels_last input is copied)
        y = F.batch_norm(x.reshape(-1, c * s, h, w), running_mean, running_var,
                         self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        self.running_mean.copy_(running_mean.view(s, c).mean(0))
        self.running_var.copy_(running_var.view(s, c).mean(0))
        return y.reshape(n, c, h, w)


def _norm_layer(bn_splits: int) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if bn_splits <= 1 else partial(SplitBatchNorm2d, num_splits=bn_splits)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), bn_splits: int = 1):
        super().__init__()
        norm = _norm_layer(bn_splits)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(BasicBlock(cin, w, 1 if i == 0 else 2, norm))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.feat_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def c4_split(self) -> tuple[nn.Module, nn.Module, int, int]:
        """(everything up to the last stage, the last stage, their channels): the R50-C4 cut."""
        widths = [b.conv1.out_channels for b in self.layers]
        return nn.Sequential(self.stem, *self.layers[:-1]), self.layers[-1], widths[-2], widths[-1]


class TorchvisionResNet(nn.Module):
    def __init__(self, arch: str, bn_splits: int = 1, cifar_stem: bool = False):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(bn_splits))
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def c4_split(self) -> tuple[nn.Module, nn.Module, int, int]:
        """(stem + layer1-3 = res2-res4, layer4 = res5, their channels): the R50-C4 cut."""
        n = self.net
        trunk = nn.Sequential(n.conv1, n.bn1, n.relu, n.maxpool, n.layer1, n.layer2, n.layer3)
        c4 = [m for m in n.layer3.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        return trunk, n.layer4, c4, self.feat_dim


def build_backbone(bb: BackboneSpec) -> nn.Module:
    """A freshly initialised backbone mapping N×3×S×S images to N×``feat_dim`` features, from the
    grid's ``backbone`` section (``cifar_stem`` applies to the torchvision ResNets; the tiny ResNet
    always has a CIFAR stem). Raises ValueError for a name not in BACKBONES."""
    if bb.name == "tiny_resnet":
        return TinyResNet(bn_splits=bb.bn_splits)
    if bb.name in ("resnet18", "resnet50"):
        return TorchvisionResNet(bb.name, bb.bn_splits, bb.cifar_stem)
    raise ValueError(f"unknown backbone {bb.name!r}")


BACKBONES = ("tiny_resnet", "resnet18", "resnet50")

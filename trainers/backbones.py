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


class _SplitBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm with statistics per (sub-batch, channel), in whatever memory layout
    the input has. Sub-batch j holds rows j, j+S, j+2S… of the batch, as the reshape to
    (N/S, S·C, H, W) of moco's SplitBatchNorm groups them. Statistics are accumulated in fp32
    whatever the input dtype (as cuDNN's BatchNorm does); only the input (in its own dtype and
    layout) and the S×C statistics are kept for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, splits: int, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16 inputs, fp64 stays fp64
        xv = x.view(n // splits, splits, c, h, w)  # a view in either layout: only the batch dimension is split
        var, mean = torch.var_mean(xv.to(acc), dim=(0, 3, 4), correction=0)  # S×C each
        invstd = torch.rsqrt(var + eps)
        scale = weight.to(acc)[None] * invstd  # S×C
        shift = bias.to(acc)[None] - mean * scale
        # one fused multiply-add in the input's dtype (computed in fp32 inside), written into a tensor of
        # x's layout (the output must not be a view: the ReLU after it works in place)
        y = torch.empty_like(x)
        torch.addcmul(shift.to(x.dtype)[None, :, :, None, None], xv, scale.to(x.dtype)[None, :, :, None, None],
                      out=y.view(n // splits, splits, c, h, w))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.splits = splits
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        s = ctx.splits
        n, c, h, w = x.shape
        count = (n // s) * h * w  # values behind each statistic
        xv = x.view(n // s, s, c, h, w)
        dyv = dy.reshape(n // s, s, c, h, w).to(mean.dtype)
        xhat = (xv.to(mean.dtype) - mean[None, :, :, None, None]) * invstd[None, :, :, None, None]
        sum_dy = dyv.sum(dim=(0, 3, 4))  # S×C
        sum_dy_xhat = (dyv * xhat).sum(dim=(0, 3, 4))
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            # d/dx of w·(x − μ)/σ + b with μ, σ the sub-batch's own statistics
            k = (weight.to(mean.dtype)[None] * invstd)[None, :, :, None, None]
            dx = torch.empty_like(x)
            dx.view(n // s, s, c, h, w).copy_((dyv - sum_dy[None, :, :, None, None] / count
                                              - xhat * (sum_dy_xhat[None, :, :, None, None] / count)) * k)
        if ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = sum_dy.sum(0).to(weight.dtype)
        return dx, dweight, dbias, None, None


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from ``num_splits`` equal sub-batches (rows j, j+S,
    j+2S… form sub-batch j): moco's SplitBatchNorm (a reshape of N×C×H×W to N/S×S·C×H×W and one
    BatchNorm). On a contiguous input that reshape is a view, and it is kept. On any other layout
    (channels_last, which the loop uses on CUDA) it would copy the input at every layer and hand
    the next convolution a contiguous tensor (issue 19), so the same numbers are computed on a view
    that splits only the batch dimension (``_SplitBatchNorm``), and the output keeps the input's
    layout. The running statistics move by ``momentum`` towards the mean over the sub-batches of
    their mean and unbiased variance, as the reshaped BatchNorm's do once averaged."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: N×C×H×W (any memory layout; the output keeps it). Raises ValueError when N is not a
        multiple of ``num_splits``."""
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"batch {n} is not divisible by bn_splits={self.num_splits}")
        if (n // self.num_splits) * h * w < 2:
            raise ValueError(f"BatchNorm needs more than 1 value per channel in each of the {self.num_splits} "
                             f"sub-batches; got input of size {tuple(x.shape)}")
        weight = self.weight if self.weight is not None else x.new_ones(c)
        bias = self.bias if self.bias is not None else x.new_zeros(c)
        if x.is_contiguous():
            return self._reshaped(x, weight, bias)
        y, mean, var = _SplitBatchNorm.apply(x, weight, bias, self.num_splits, self.eps)
        if self.track_running_stats and self.momentum is not None:
            with torch.no_grad():
                count = (n // self.num_splits) * h * w
                unbiased = var * (count / max(count - 1, 1))
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.mean(0).to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.mean(0).to(self.running_var.dtype), alpha=m)
        return y

    def _reshaped(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """moco's way, for a contiguous (N×C×H×W) input, where the reshape to (N/S, S·C, H, W) is a
        view and one fused BatchNorm does the rest (faster than _SplitBatchNorm on a CPU)."""
        n, c, h, w = x.shape
        s = self.num_splits
        running_mean = self.running_mean.repeat(s) if self.track_running_stats else None
        running_var = self.running_var.repeat(s) if self.track_running_stats else None
        y = F.batch_norm(x.view(n // s, s * c, h, w), running_mean, running_var, weight.repeat(s), bias.repeat(s),
                         True, self.momentum if self.momentum is not None else 0.0, self.eps)
        if self.track_running_stats and self.momentum is not None:
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
        return y.view(n, c, h, w)


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

"""What split BatchNorm costs: a backbone's forward and backward pass in training mode (channels_last
and autocast on CUDA) with ``bn_splits`` sub-batches (trainers/backbones.py SplitBatchNorm2d, which keeps
channels_last), against the same backbone with plain BatchNorm, and against moco's reshape
implementation (its CIFAR demo's SplitBatchNorm: N×C×H×W → N/S×S·C×H×W, one BatchNorm, back), which
sslgrid used before issue 19 and which copies a channels_last input at every layer. Steady-state
figures (bench/steady.py). Prints images/s and the ratios.

    python bench/split_bn.py [--backbone tiny_resnet] [--size 32] [--batch 64] [--splits 8]
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.steady import Meter, Rate, Window  # noqa: E402
from pipeline.spec import BackboneSpec  # noqa: E402
from trainers.backbones import SplitBatchNorm2d, build_backbone  # noqa: E402
from trainers.loop import autocast, prepare, resolve_precision  # noqa: E402


class ReshapeSplitBatchNorm2d(nn.BatchNorm2d):
    """moco's SplitBatchNorm (colab/moco_cifar10_demo.ipynb), as trainers/backbones.py had it."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        s = self.num_splits
        running_mean, running_var = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(-1, c * s, h, w), running_mean, running_var, self.weight.repeat(s),
                         self.bias.repeat(s), True, self.momentum, self.eps)
        self.running_mean.copy_(running_mean.view(s, c).mean(0))
        self.running_var.copy_(running_var.view(s, c).mean(0))
        return y.reshape(n, c, h, w)


def backbone(name: str, size: int, splits: int, reshape: bool = False) -> nn.Module:
    """The backbone with ``splits`` BN groups (1: plain BatchNorm); ``reshape``: moco's implementation."""
    torch.manual_seed(0)
    net = build_backbone(BackboneSpec(name=name, cifar_stem=size <= 64, bn_splits=splits))
    if reshape:
        for mod in list(net.modules()):
            for child_name, child in mod.named_children():
                if isinstance(child, SplitBatchNorm2d):
                    new = ReshapeSplitBatchNorm2d(child.num_features, child.num_splits)
                    new.load_state_dict(child.state_dict())
                    setattr(mod, child_name, new)
    return net


def train_rate(net: nn.Module, batch: int, size: int, window: Window, precision: str) -> Rate:
    """Steady-state forward + backward passes of ``net`` in training mode on one random batch
    (images/s). No optimizer step: the weights stay as initialised, so no run drifts towards
    denormal numbers that would slow a CPU down, and BatchNorm's share of the step is not diluted."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = prepare(net, dev).train()
    x = torch.randn(batch, 3, size, size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(batch, net.feat_dim, device=dev)

    def steps() -> Iterator[int]:
        while True:
            with autocast(dev, precision):
                loss = (net(x).float() - target).pow(2).mean()
            loss.backward()
            net.zero_grad(set_to_none=True)
            yield batch

    return Meter(window, size=lambda n: n).run(steps())


def compare(name: str, size: int, batch: int, splits: int, window: Window, precision: str = "auto") -> dict[str, Rate]:
    """Plain BN, split BN (ours) and split BN (moco's reshape): name → rate."""
    precision = resolve_precision(precision)
    return {"plain_bn": train_rate(backbone(name, size, 1), batch, size, window, precision),
            f"split_bn_{splits}": train_rate(backbone(name, size, splits), batch, size, window, precision),
            f"reshape_split_bn_{splits}": train_rate(backbone(name, size, splits, reshape=True), batch, size, window,
                                                     precision)}


def main() -> None:
    from bench.pretrain_step import step_window

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--splits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    res = compare(args.backbone, args.size, args.batch, args.splits, step_window(args.steps, args.seconds))
    plain = res["plain_bn"].per_second
    print("   ".join(f"{k} {r.per_second:8.1f} img/s ({r.per_second / plain:.2f}x plain)" for k, r in res.items()))


if __name__ == "__main__":
    main()

"""The ``inversion`` evaluation stage (the paper's Fig. 2): what the features h (before the projection
head) and z (after it) keep of an image, shown by Deep Image Prior feature inversion.

For each of a fixed set of val images x and each target φ ∈ {h, z}: a U-Net R with skip connections
maps a fixed noise input Z ~ U(0, 0.1) (32 channels, DIP's default) to an image, and R's weights are
optimised with Adam (lr 1e-3, DIP's default) so that ||φ(R(Z)) − φ(x)||² falls, with the pretrained
encoder frozen in eval mode (Ulyanov et al. 2018, deep-image-prior's feature-inversion recipe, with the
iterations scaled to the budget). z is inverted only when the pretraining has a projection head.

Artifacts: ``inversion.png`` (one row per image: original | R(Z) for h | R(Z) for z) and
``inversion.pt`` (the originals and reconstructions), from which the report assembles Fig. 2 across
cells. Metrics: the feature loss at the first and last iteration, per target.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.augment import AugmentParams, normalize
from trainers.data import load_split
from trainers.files import atomic_write
from trainers.loop import device
from trainers.pretrain import load_backbone, load_head
from trainers.results import EvalResult, PretrainResult
from trainers.sink import Sink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class UNet(nn.Module):
    """DIP's encoder-decoder with skips: each level halves the resolution going down; going up, the
    upsampled map is concatenated with the skip from the same level."""

    def __init__(self, cin: int = 32, channels: tuple[int, ...] = (32, 64, 128), skip: int = 4):
        super().__init__()
        self.down = nn.ModuleList()
        self.skips = nn.ModuleList()
        c = cin
        for ch in channels:
            self.skips.append(_block(c, skip))
            self.down.append(nn.Sequential(_block(c, ch, 2), _block(ch, ch)))
            c = ch
        self.up = nn.ModuleList()
        for ch in reversed(channels):
            self.up.append(nn.Sequential(_block(c + skip, ch), _block(ch, ch)))
            c = ch
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skips, x = [], z
        for skip, down in zip(self.skips, self.down):
            skips.append(skip(x))
            x = down(x)
        for up, s in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, s], 1))
        return torch.sigmoid(self.out(x))


def invert(encoder: nn.Module, target: torch.Tensor, size: int, iterations: int, lr: float, seed: int,
           noise_channels: int = 32) -> tuple[torch.Tensor, list[float]]:
    """One image: returns (R(Z) as 3×size×size in [0, 1], the loss at every iteration)."""
    dev = target.device
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = UNet(noise_channels).to(dev)
    z = (torch.rand(1, noise_channels, size, size, generator=g) * 0.1).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(iterations):
        loss = F.mse_loss(encoder(normalize(net(z), AugmentParams())), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        return net(z)[0].cpu(), losses


def inversion(cfg: StageConfig, upstream: PretrainResult, workdir: Path, sink: Sink) -> EvalResult:
    """Reads ``cfg.dataset``, ``cfg.backbone``, ``cfg.inversion`` and, through
    trainers/pretrain.py's ``load_head``, what the pretraining's head was; ``upstream``: the
    pretraining stage's result (its ``checkpoint``). Writes ``inversion.png`` and ``inversion.pt``
    (``originals`` and one entry per target, each images×3×S×S in [0, 1]); returns ``images``,
    ``targets`` (["h"] or ["h", "z"]) and ``inv_loss_<target>_first`` / ``_last`` (mean squared
    feature error, averaged over the images). Raises DataError (trainers/data.py) for unreadable data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = cfg.inversion
    dev = device()
    backbone = load_backbone(cfg, upstream.checkpoint).to(dev).requires_grad_(False)
    head = load_head(cfg, upstream.checkpoint)
    encoders = {"h": backbone}
    if head is not None:
        encoders["z"] = nn.Sequential(backbone, head.to(dev).requires_grad_(False))
    val = load_split(cfg.dataset, "val")
    pick = torch.randperm(len(val.labels), generator=torch.Generator().manual_seed(p.seed))[:p.images]
    originals = val.images[pick].float().div(255)
    size = originals.shape[-1]
    recon: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    result: dict = {"images": len(pick), "targets": list(encoders)}
    for name, enc in encoders.items():
        first, last = [], []
        for i, x in enumerate(originals):
            with torch.no_grad():
                target = enc(normalize(x[None].to(dev), AugmentParams()))
            img, losses = invert(enc, target, size, p.iterations, p.lr, p.seed + i)
            recon[name].append(img)
            first.append(losses[0])
            last.append(losses[-1])
        result[f"inv_loss_{name}_first"] = sum(first) / len(first)
        result[f"inv_loss_{name}_last"] = sum(last) / len(last)
        sink.progress(len(recon), len(encoders))
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "inversion.pt") as tmp:
        torch.save({"originals": originals, **{k: torch.stack(v) for k, v in recon.items()}}, tmp)
    cols = ["original"] + [f"R(Z) for {k}" for k in encoders]
    fig, axes = plt.subplots(len(pick), len(cols), figsize=(1.5 * len(cols), 1.5 * len(pick)), dpi=p.dpi,
                             squeeze=False)
    for r in range(len(pick)):
        for c, img in enumerate([originals[r]] + [recon[k][r] for k in encoders]):
            axes[r][c].imshow(img.permute(1, 2, 0).numpy())
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(cols[c], fontsize=7)
    fig.tight_layout()
    with atomic_write(out / "inversion.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    sink.log({k: v for k, v in result.items() if k.startswith("inv_loss")}, step=0)
    return EvalResult.of(result)

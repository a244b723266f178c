"""Batched two-view augmentation on image tensors, on whatever device the batch is on.

One call augments a whole batch, with independent parameters per sample, instead of one PIL call per
image (the input bottleneck moco#33 reports). The operations and their parameter ranges follow
torchvision's ``RandomResizedCrop``, ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur`` and
``RandomHorizontalFlip``, as composed by MoCo v2's "aug-plus" (facebookresearch/moco, main_moco.py):

    RRC(scale=(0.2, 1)) → ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8 → Grayscale w.p. 0.2
    → GaussianBlur(σ ~ U[0.1, 2]) w.p. 0.5 → HFlip → Normalize

Two known differences from the PIL pipeline:
- the order of the four jitter operations is drawn once per batch, not once per image;
- the crop is resampled bilinearly by ``roi_align`` (2×2 samples per output pixel), not by PIL.

All randomness comes from the ``generator`` argument, so an epoch's augmentations are a function of
the seed alone: that is what lets a resumed run match an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentParams:
    """Resolved augmentation: what a grid's ``augment`` section becomes."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def sample_crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                      g: torch.Generator, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: ``tries`` candidates per image, the
    first that fits wins, else the whole image clipped to the ratio range. Returns n×4 (x1,y1,x2,y2)."""
    area = h * w
    target = area * (torch.rand(n, tries, generator=g) * (scale[1] - scale[0]) + scale[0])
    log_r = torch.rand(n, tries, generator=g) * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0])
    aspect = torch.exp(log_r)
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    ux = torch.rand(n, generator=g)
    uy = torch.rand(n, generator=g)
    rows = torch.arange(n)
    idx = first.clamp(min=0)
    bw, bh = cw[rows, idx], ch[rows, idx]
    # fallback: centre crop of the whole image with the ratio clamped, as torchvision does
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    ok = first >= 0
    bw = torch.where(ok, bw, torch.full_like(bw, fw))
    bh = torch.where(ok, bh, torch.full_like(bh, fh))
    x1 = torch.where(ok, torch.floor(ux * (w - bw + 1)), torch.full_like(bw, (w - fw) // 2))
    y1 = torch.where(ok, torch.floor(uy * (h - bh + 1)), torch.full_like(bh, (h - fh) // 2))
    return torch.stack([x1, y1, x1 + bw, y1 + bh], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of x (N×C×H×W float) to its box and resize to size×size, in one kernel."""
    n = x.shape[0]
    rois = torch.cat([torch.arange(n, dtype=x.dtype, device=x.device)[:, None], boxes.to(x)], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f[:, None, None, None] * a + (1 - f[:, None, None, None]) * b).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-8)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None]).squeeze(1)
    return torch.stack([r, g, b], 1)


def color_jitter(x: torch.Tensor, strength: tuple[float, float, float, float], g: torch.Generator) -> torch.Tensor:
    """torchvision ColorJitter semantics on a float batch in [0, 1], a factor per image."""
    n, dev = x.shape[0], x.device
    b, c, s, h = strength
    for op in torch.randperm(4, generator=g).tolist():
        if op == 0 and b > 0:
            f = _uniform(n, max(0.0, 1 - b), 1 + b, g, dev)
            x = (x * f[:, None, None, None]).clamp_(0, 1)
        elif op == 1 and c > 0:
            f = _uniform(n, max(0.0, 1 - c), 1 + c, g, dev)
            mean = _gray(x).mean((1, 2, 3), keepdim=True).expand_as(x)
            x = _blend(x, mean, f)
        elif op == 2 and s > 0:
            f = _uniform(n, max(0.0, 1 - s), 1 + s, g, dev)
            x = _blend(x, _gray(x).expand_as(x), f)
        elif op == 3 and h > 0:
            f = _uniform(n, -h, h, g, dev)
            hsv = _rgb_to_hsv(x)
            hsv[:, 0] = (hsv[:, 0] + f[:, None, None]) % 1.0
            x = _hsv_to_rgb(hsv)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a σ per image; kernel ~10% of the side (SimCLR: H//10), odd, ≥3,
    and no wider than 6σ+1 for the batch's largest σ (the taps beyond 3σ carry < 0.3% of the weight)."""
    n, ch, hgt, wid = x.shape
    k = max(3, min(int(0.1 * hgt) // 2 * 2 + 1, 2 * math.ceil(3 * float(sigma.max())) + 1))
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None].to(x) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # n×k
    w = kern.repeat_interleave(ch, 0)  # (n·ch)×k
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), w[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), w[:, None, :, None], groups=n * ch)
    return y.reshape(n, ch, hgt, wid)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None, None], a, b)


def augment(images: torch.Tensor, p: AugmentParams, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch (N×3×H×W), normalised float N×3×size×size."""
    n, _, h, w = images.shape
    dev = images.device
    x = images.float().div_(255)
    x = resized_crop(x, sample_crop_boxes(n, h, w, p.crop_scale, p.crop_ratio, g).to(dev), size)
    if p.jitter_p > 0 and any(v > 0 for v in p.jitter):
        on = (torch.rand(n, generator=g) < p.jitter_p).to(dev)
        x = _where(on, color_jitter(x, p.jitter, g), x)
    if p.grayscale_p > 0:
        on = (torch.rand(n, generator=g) < p.grayscale_p).to(dev)
        x = _where(on, _gray(x).expand_as(x), x)
    if p.blur_p > 0:
        on = (torch.rand(n, generator=g) < p.blur_p).to(dev)
        sigma = _uniform(n, p.blur_sigma[0], p.blur_sigma[1], g, dev)
        x = _where(on, gaussian_blur(x, sigma), x)
    if p.flip_p > 0:
        on = (torch.rand(n, generator=g) < p.flip_p).to(dev)
        x = _where(on, x.flip(3), x)
    return normalize(x, p)


def normalize(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    mean = torch.tensor(p.mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(p.std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


def eval_view(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """No augmentation: the uint8 batch as a normalised float batch."""
    return normalize(images.float().div(255), p)


def probe_view(images: torch.Tensor, p: AugmentParams, size: int, g: torch.Generator) -> torch.Tensor:
    """main_lincls's training transform: RandomResizedCrop (scale 0.08–1) + flip, nothing else."""
    n, _, h, w = images.shape
    x = images.float().div_(255)
    x = resized_crop(x, sample_crop_boxes(n, h, w, (0.08, 1.0), p.crop_ratio, g).to(images.device), size)
    on = (torch.rand(n, generator=g) < 0.5).to(images.device)
    return normalize(_where(on, x.flip(3), x), p)

"""Batched two-view augmentation on image tensors, on whatever device the batch is on.

One call augments a whole batch, with independent parameters per sample, instead of one PIL call per
image (the input bottleneck moco#33 reports). The operations and their parameter ranges follow
torchvision's ``RandomResizedCrop``, ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur`` and
``RandomHorizontalFlip``, as composed by MoCo v2's "aug-plus" (facebookresearch/moco, main_moco.py):

    RRC(scale=(0.2, 1)) → ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8 → Grayscale w.p. 0.2
    → GaussianBlur(σ ~ U[0.1, 2]) w.p. 0.5 → HFlip → Normalize

with BYOL's solarisation after the blur when ``solarize_p`` > 0 (its second view: p 0.2).

Known differences from the PIL pipeline:
- the order of the four jitter operations is drawn once per batch, not once per image;
- the crop is resampled bilinearly by ``roi_align``, with s×s samples per output pixel where s is the
  batch's mean downscale factor rounded up (1 when the crops are upsampled), not by PIL;

Colour jitter, grayscale and blur are computed only for the images drawn to receive them.

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
    solarize_p: float = 0.0  # BYOL's second view: 0.2
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
    side = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])).float().mean().item() / 2
    ratio = max(1, math.ceil(side / size))
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f[:, None, None, None] * a + (1 - f[:, None, None, None]) * b).clamp_(0, 1)


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
            x = hue_shift(x, _uniform(n, -h, h, g, dev))
    return x


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (hue += shift turns, in HSV) per image, without the HSV round trip:
    saturation and value are unchanged, so each channel is max − Δ·clamp(min(k, 4−k), 0, 1) with
    k = (n + 6·hue) mod 6 and n = 5, 3, 1 for R, G, B (the closed form of HSV→RGB)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    inv = 1.0 / torch.where(delta > 0, delta, torch.ones_like(delta))
    # hue in sixths of a turn: (g−b)/Δ where R is max, 2+(b−r)/Δ where G is, 4+(r−g)/Δ where B is
    h = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r + 2.0 * delta, r - g + 4.0 * delta)) * inv
    h = h + 6.0 * shift.to(x)[:, None, None]  # in sixths of a turn; grey pixels (Δ=0) stay grey below
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device)[None, :, None, None]
    k = torch.remainder(n + h[:, None], 6.0)
    return maxc[:, None] - delta[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


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


def solarize(x: torch.Tensor) -> torch.Tensor:
    """BYOL's solarisation of a [0, 1] image: pixels at or above 0.5 become 1 − x (torchvision's
    RandomSolarize(threshold=0.5) on float images)."""
    return torch.where(x >= 0.5, 1.0 - x, x)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None, None], a, b)


def _apply_to(x: torch.Tensor, on: torch.Tensor, fn) -> torch.Tensor:
    """x with fn applied to the images where ``on`` is set; fn sees only those (index order kept)."""
    idx = on.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(x)
    x = x.clone()
    x[idx] = fn(x[idx])
    return x


# On the CPU every op is a pass over memory; working on chunks of about this many bytes keeps a chunk
# in cache between ops. Measured at 224 px (2 cores): 151 img/s for a batch of 256 in one piece,
# 374 img/s in chunks of 8. At 32 px a whole batch of 256 fits and chunking only costs.
CPU_CHUNK_BYTES = 8 << 20


def augment(images: torch.Tensor, p: AugmentParams, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch (N×3×H×W), normalised float N×3×size×size."""
    n, c, h, w = images.shape
    chunk = max(1, CPU_CHUNK_BYTES // (4 * c * max(h * w, size * size)))
    if images.device.type == "cpu" and n > chunk:
        return torch.cat([_augment(images[i:i + chunk], p, size, g) for i in range(0, n, chunk)])
    return _augment(images, p, size, g)


def _augment(images: torch.Tensor, p: AugmentParams, size: int, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = images.shape
    dev = images.device
    x = images.float().div_(255)
    x = resized_crop(x, sample_crop_boxes(n, h, w, p.crop_scale, p.crop_ratio, g).to(dev), size)
    # Random draws stay on the CPU generator, in a fixed order, whatever subset they select: the
    # augmentation of an epoch is a function of the seed alone (resume depends on it).
    if p.jitter_p > 0 and any(v > 0 for v in p.jitter):
        on = torch.rand(n, generator=g) < p.jitter_p
        x = _apply_to(x, on.to(dev), lambda v: color_jitter(v, p.jitter, g))
    if p.grayscale_p > 0:
        on = torch.rand(n, generator=g) < p.grayscale_p
        x = _apply_to(x, on.to(dev), lambda v: _gray(v).expand_as(v))
    if p.blur_p > 0:
        on = torch.rand(n, generator=g) < p.blur_p
        sigma = _uniform(n, p.blur_sigma[0], p.blur_sigma[1], g, dev)
        x = _apply_to(x, on.to(dev), lambda v: gaussian_blur(v, sigma[on.to(dev)]))
    if p.solarize_p > 0:
        on = torch.rand(n, generator=g) < p.solarize_p
        x = _apply_to(x, on.to(dev), solarize)
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

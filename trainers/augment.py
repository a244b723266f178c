"""Batched two-view augmentation on image tensors, on whatever device the batch is on.

One call augments a whole batch, with independent parameters per sample, instead of one PIL call per
image (the input bottleneck moco#33 reports). The operations and their parameter ranges follow
torchvision's ``RandomResizedCrop``, ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur`` and
``RandomHorizontalFlip``, as composed by MoCo v2's "aug-plus" (facebookresearch/moco, main_moco.py):

    RRC(scale=(0.2, 1)) → ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8 → Grayscale w.p. 0.2
    → GaussianBlur(σ ~ U[0.1, 2]) w.p. 0.5 → HFlip → Normalize

with BYOL's solarisation after the blur when ``solarize_p`` > 0 (its second view: p 0.2).

It is split in two so that the data path can do each part where it is cheapest:

- ``geometry``: the crop box, drawn on the image's **original** size (torchvision draws it on the
  decoded original), then resized to the output size. The streaming data path
  (trainers/loader.py) does this in DataLoader workers with PIL, on the JPEG decoded at the
  smallest DCT scale that still gives the box the output resolution; in-memory data does it here,
  batched, with ``roi_align`` (adaptive sampling: ceil(box side / output side) samples per output
  pixel, per box);
- ``photometric``: colour jitter (the four operations in a random order per image, as
  torchvision), grayscale, blur, solarisation, flip and normalisation, batched on the device.

Every random number of a sample comes from one row of ``DRAWS`` uniforms (the layout below). The
data path takes that row from trainers/keyed.py, keyed by (seed, epoch, sample index, view), so a
sample's augmentation is the same whichever rank, worker or batch handles it; ``augment`` draws it
from a generator instead, for callers outside the training loop. The draws stay on the CPU, so
choosing which images receive an operation never waits on the device.

Known differences from the PIL pipeline: in-memory crops are resampled by ``roi_align``, not by PIL.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Layout of a sample's row of uniforms: RandomResizedCrop's 10 tries of (area, log-ratio), then
# the box's x and y; then jitter on/off, its 4 factors and its order; grayscale; blur on/off and σ;
# solarisation; flip.
CROP_TRIES = 10
_CROP = slice(0, 2 * CROP_TRIES + 2)
_JITTER_ON, _JITTER_F, _JITTER_ORDER = 22, slice(23, 27), 27
_GRAY, _BLUR_ON, _SIGMA, _SOLAR, _FLIP = 28, 29, 30, 31, 32
DRAWS = 33
_ORDERS = torch.tensor(list(itertools.permutations(range(4))))  # 24×4: torchvision's randperm(4) per image


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


# main_lincls's training transform: RandomResizedCrop(224) (scale 0.08–1) + flip, nothing else
PROBE_VIEW = AugmentParams(crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def crop_boxes(u: torch.Tensor | np.ndarray, h, w, scale: tuple[float, float],
               ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised over a batch: 10 candidate boxes per
    image, the first that fits wins, else the whole image clipped to the ratio range.

    u: N×22 uniforms (the crop columns of a DRAWS row); h, w: the original's height and width in
    pixels, ints or N-vectors. Returns N×4 float64 boxes (x1, y1, x2, y2) in pixels. (numpy inside:
    DataLoader workers call it per image, where torch's per-op overhead would dominate.)"""
    u = np.asarray(u, dtype=np.float64)
    n = u.shape[0]
    h = np.broadcast_to(np.asarray(h, dtype=np.float64), (n,))
    w = np.broadcast_to(np.asarray(w, dtype=np.float64), (n,))
    t = CROP_TRIES
    area = (h * w)[:, None]
    target = area * (u[:, :t] * (scale[1] - scale[0]) + scale[0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(u[:, t:2 * t] * (hi - lo) + lo)
    cw = np.round(np.sqrt(target * aspect))
    ch = np.round(np.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w[:, None]) & (ch <= h[:, None])
    ok = fits.any(1)
    pick = fits.argmax(1)
    rows = np.arange(n)
    bw, bh = cw[rows, pick], ch[rows, pick]
    # fallback: a centre crop of the whole image with the ratio clamped, as torchvision does
    in_ratio = w / h
    fw = np.where(in_ratio < ratio[0], w, np.where(in_ratio > ratio[1], np.round(h * ratio[1]), w))
    fh = np.where(in_ratio < ratio[0], np.round(w / ratio[0]), h)
    bw, bh = np.where(ok, bw, fw), np.where(ok, bh, fh)
    x1 = np.where(ok, np.floor(u[:, 2 * t] * (w - bw + 1)), np.floor((w - fw) / 2))
    y1 = np.where(ok, np.floor(u[:, 2 * t + 1] * (h - bh + 1)), np.floor((h - fh) / 2))
    return torch.from_numpy(np.stack([x1, y1, x1 + bw, y1 + bh], 1))


def sample_crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                      g: torch.Generator) -> torch.Tensor:
    """``crop_boxes`` with the uniforms drawn from ``g``. Returns N×4 (x1, y1, x2, y2)."""
    return crop_boxes(torch.rand(n, 2 * CROP_TRIES + 2, generator=g, dtype=torch.float64), h, w, scale, ratio)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of x (N×C×H×W float) to its box (N×4, pixels) and resize it to size×size, in
    one kernel; each box gets ceil(side / size) samples per output pixel (roi_align's adaptive mode)."""
    n = x.shape[0]
    rois = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], boxes.to(torch.float64).cpu()], 1)
    rois = to_device(rois.to(x.dtype), x.device)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without a host synchronisation: pinned and copied asynchronously
    on CUDA (a pageable copy waits for the stream to drain)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def geometry(images: torch.Tensor, u: torch.Tensor, p: AugmentParams, size: int) -> torch.Tensor:
    """The crop of each uint8 image (N×3×H×W, H×W its original size), resized: float N×3×size×size
    in [0, 1]. u: N×DRAWS uniforms on the CPU."""
    _, _, h, w = images.shape
    x = images.float().div_(255)
    return resized_crop(x, crop_boxes(np.asarray(u)[:, _CROP], h, w, p.crop_scale, p.crop_ratio), size)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f[:, None, None, None] * a + (1 - f[:, None, None, None]) * b).clamp_(0, 1)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One of ColorJitter's operations with a factor per image (f on x's device)."""
    if op == 0:
        return (x * f[:, None, None, None]).clamp_(0, 1)
    if op == 1:
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True).expand_as(x), f)
    if op == 2:
        return _blend(x, _gray(x).expand_as(x), f)
    return hue_shift(x, f)


def color_jitter(x: torch.Tensor, strength: tuple[float, float, float, float], u: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter on a float batch in [0, 1]: per image, a factor for each operation and
    the order of the four. u: N×5 uniforms on the CPU (4 factors, then the order). The images are
    grouped by their order (at most 24 groups), so each group runs its four operations on a
    contiguous slice: no per-operation gather and scatter, and the slice stays in cache on a CPU."""
    ranges = [(max(0.0, 1 - s), 1 + s) for s in strength[:3]] + [(-strength[3], strength[3])]
    factors = torch.stack([u[:, i] * (hi - lo) + lo for i, (lo, hi) in enumerate(ranges)], 1).to(torch.float32)
    perm_id = (u[:, 4] * len(_ORDERS)).long().clamp_(max=len(_ORDERS) - 1)
    rows = torch.argsort(perm_id, stable=True)
    counts = torch.bincount(perm_id, minlength=len(_ORDERS)).tolist()  # CPU: no device read-back
    dev_rows = to_device(rows, x.device)
    grouped = x[dev_rows]
    f = to_device(factors[rows], x.device)
    start = 0
    for pid, count in enumerate(counts):
        if count:
            part = grouped[start:start + count]
            for op in _ORDERS[pid].tolist():
                if strength[op] > 0:
                    part = _jitter_op(part, op, f[start:start + count, op])
            grouped[start:start + count] = part
            start += count
    out = torch.empty_like(x)
    out[dev_rows] = grouped
    return out


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
    k = torch.remainder(_hue_offsets(x.device, x.dtype) + h[:, None], 6.0)
    return maxc[:, None] - delta[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a σ per image (sigma: N, on the CPU); kernel ~10% of the side
    (SimCLR: H//10), odd, ≥3, and no wider than 6σ+1 for the batch's largest σ (the taps beyond 3σ
    carry < 0.3% of the weight)."""
    n, ch, hgt, wid = x.shape
    sigma = sigma.cpu().to(torch.float32)
    k = max(3, min(int(0.1 * hgt) // 2 * 2 + 1, 2 * math.ceil(3 * float(sigma.max())) + 1))
    r = torch.arange(k, dtype=torch.float32) - k // 2
    kern = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kern = to_device(kern / kern.sum(1, keepdim=True), x.device).to(x.dtype)  # n×k
    w = kern.repeat_interleave(ch, 0)  # (n·ch)×k
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), w[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), w[:, None, :, None], groups=n * ch)
    return y.reshape(n, ch, hgt, wid)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """BYOL's solarisation of a [0, 1] image: pixels at or above 0.5 become 1 − x (torchvision's
    RandomSolarize(threshold=0.5) on float images)."""
    return torch.where(x >= 0.5, 1.0 - x, x)


def _apply_to(x: torch.Tensor, on: torch.Tensor, fn) -> torch.Tensor:
    """x with fn(images, selection) applied to the images where ``on`` (N bool, CPU) is set; fn sees
    only those, in index order, and ``selection`` is their CPU index. Writes into x, which the
    augmentation owns (it made it from the uint8 input)."""
    sel = on.nonzero().squeeze(1)
    if sel.numel() == 0:
        return x
    if sel.numel() == x.shape[0]:
        return fn(x, sel)
    dev_sel = to_device(sel, x.device)
    if not x.is_contiguous():  # an expanded (all-grayscale) batch cannot be written into
        x = x.contiguous()
    x[dev_sel] = fn(x[dev_sel], sel)
    return x


# On the CPU every op is a pass over memory; working on chunks of about this many bytes keeps a chunk
# in cache between ops. Measured at 224 px (2 cores): 151 img/s for a batch of 256 in one piece,
# 374 img/s in chunks of 8. At 32 px a whole batch of 256 fits and chunking only costs.
CPU_CHUNK_BYTES = 8 << 20


def photometric(x: torch.Tensor, u: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Colour jitter, grayscale, blur, solarisation, flip and normalisation of a batch (N×3×S×S,
    uint8, or float in [0, 1] that this function may overwrite; any device), with the parameters in
    u (N×DRAWS uniforms, CPU). Returns normalised float N×3×S×S. On the CPU it works through chunks
    that stay in cache, converting each from uint8 on the way in."""
    n, c, h, w = x.shape
    u = torch.as_tensor(u, dtype=torch.float64)
    chunk = max(1, CPU_CHUNK_BYTES // (4 * c * h * w))
    if x.device.type != "cpu" or n <= chunk:
        return _photometric(_as_float(x), u, p)
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    for i in range(0, n, chunk):
        out[i:i + chunk] = _photometric(_as_float(x[i:i + chunk]), u[i:i + chunk], p)
    return out


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (any layout) → contiguous float in [0, 1], in one pass; a float batch as it is."""
    if x.dtype != torch.uint8:
        return x
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def _photometric(x: torch.Tensor, u: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    if p.jitter_p > 0 and any(v > 0 for v in p.jitter):
        on = u[:, _JITTER_ON] < p.jitter_p
        ju = torch.cat([u[:, _JITTER_F], u[:, _JITTER_ORDER:_JITTER_ORDER + 1]], 1)
        x = _apply_to(x, on, lambda v, sel: color_jitter(v, p.jitter, ju[sel]))
    if p.grayscale_p > 0:
        x = _apply_to(x, u[:, _GRAY] < p.grayscale_p, lambda v, sel: _gray(v).expand_as(v))
    if p.blur_p > 0:
        sigma = u[:, _SIGMA] * (p.blur_sigma[1] - p.blur_sigma[0]) + p.blur_sigma[0]
        x = _apply_to(x, u[:, _BLUR_ON] < p.blur_p, lambda v, sel: gaussian_blur(v, sigma[sel]))
    if p.solarize_p > 0:
        x = _apply_to(x, u[:, _SOLAR] < p.solarize_p, lambda v, sel: solarize(v))
    if p.flip_p > 0:
        x = _apply_to(x, u[:, _FLIP] < p.flip_p, lambda v, sel: v.flip(3))
    return _normalize_(x, p)


def augment(images: torch.Tensor, p: AugmentParams, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch (N×3×H×W), normalised float N×3×size×size, with its
    random numbers drawn from ``g`` (the training loop keys them per sample instead, see
    trainers/loader.py)."""
    u = torch.rand(images.shape[0], DRAWS, generator=g, dtype=torch.float64)
    return photometric(geometry(images, u, p, size), u, p)


@functools.lru_cache(maxsize=32)
def _hue_offsets(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """hue_shift's n = 5, 3, 1 for R, G, B as a 1×3×1×1 tensor, made once per device and dtype: a
    tensor built from a Python list is a host-to-device copy that waits for the device, and
    hue_shift runs for most images of every MoCo v2 step (issue 19: about 48 waits per step)."""
    return torch.tensor([5.0, 3.0, 1.0], dtype=dtype, device=device)[None, :, None, None]


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=dtype, device=device)[None, :, None, None],
            torch.tensor(std, dtype=dtype, device=device)[None, :, None, None])


def normalize(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    mean, std = _mean_std(p.mean, p.std, x.device, x.dtype)  # made once per device: no copy per batch
    return (x - mean) / std


def _normalize_(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """``normalize`` in place, for a batch the augmentation owns; an expanded (grayscale) batch is
    copied first."""
    if x.stride(1) == 0:
        x = x.contiguous()
    mean, std = _mean_std(p.mean, p.std, x.device, x.dtype)
    return x.sub_(mean).div_(std)


def eval_view(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """No augmentation: the uint8 batch as a normalised float batch."""
    return normalize(images.float().div(255), p)

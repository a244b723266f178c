"""Dynamic hard-negative mining over MoCo's queue (Appalaraju et al., arXiv 2012.00868, Sec. 5, Fig. 5).

For each query, the queue is sorted by cosine similarity to it (rank 0 = the most similar, the
hardest negative). K ranks are then drawn, with replacement, from a skew-normal distribution over
rank/K: most land among the hard and semi-hard ranks, and its long right tail keeps some easy ones,
which the paper says training needs to avoid collapse. Drawing K with replacement is the paper's
oversampling: the number of negatives stays K.

No public code of the paper exists; the defaults are ours. With shape α = 4, loc = 0 and
scale = 0.4 (in units of the queue length), 2^16 draws at K = 4096 gave a mean rank fraction of
0.32, 60% of the draws in the hardest third, 21% in the easier half, 2% in the hardest 1% and a
sample skewness of 0.84 (tests/unit/test_negatives.py asserts bounds around these).
"""
from __future__ import annotations

import math

import torch


def skew_normal(n: int, shape: float, loc: float, scale: float, g: torch.Generator | None) -> torch.Tensor:
    """n draws from SkewNormal(α=shape, loc, scale): loc + scale·(δ|U₀| + √(1−δ²)·U₁), δ = α/√(1+α²),
    on the device of the generator ``g``."""
    delta = shape / math.sqrt(1 + shape * shape)
    device = g.device if g is not None else None  # None: torch's default generator, on the CPU
    u0 = torch.randn(n, generator=g, device=device)
    u1 = torch.randn(n, generator=g, device=device)
    return loc + scale * (delta * u0.abs() + math.sqrt(1 - delta * delta) * u1)


def skewnorm_ranks(rows: int, K: int, shape: float, loc: float, scale: float,
                   g: torch.Generator | None) -> torch.Tensor:
    """rows×K ranks in [0, K), drawn from a skew-normal over the rank fraction, on ``g``'s device.
    Draws below 0 are reflected (clamping would pile them onto rank 0, the single most similar key,
    often a false negative); draws at or past 1 are clipped to the easiest rank."""
    frac = skew_normal(rows * K, shape, loc, scale, g).abs().clamp(max=1.0 - 1e-6)
    return (frac * K).long().view(rows, K)


def device_generator(g: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one 63-bit integer drawn from the CPU generator ``g``: the
    step's randomness still comes from ``g`` (and from its seed, so a resumed run replays it), while
    the numbers themselves are drawn where they are used. Drawing from a CPU generator never waits
    on the device."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=g))
    return torch.Generator(device=device).manual_seed(seed)


def hard_negative_index(q: torch.Tensor, queue: torch.Tensor, shape: float, loc: float, scale: float,
                        g: torch.Generator | None) -> torch.Tensor:
    """Queue columns to use as negatives: N×K indices on q's device, hard ones most often (q: N×C,
    queue: C×K).

    On the CPU the ranks come from ``g`` itself, number for number as before issue 19
    (tests/unit/test_gpu_paths.py pins them). On any other device they are drawn there, from
    ``device_generator(g, ...)``: at K = 65,536 and N = 256 a step needs 2 × 16.7 M normal numbers,
    and drawing them on the CPU, then copying the N×K int64 index (128 MiB) to the device, took
    667 ms per step on a 2-core CPU (issue 19)."""
    with torch.no_grad():
        order = torch.argsort(q @ queue, dim=1, descending=True)  # N×K, hardest first
    rng = g if q.device.type == "cpu" else device_generator(g, q.device)
    ranks = skewnorm_ranks(q.shape[0], queue.shape[1], shape, loc, scale, rng)
    return order.gather(1, ranks)

"""The streaming data path against moco's reference loader, side by side in one run.

Writes once (and caches, in $SSLGRID_CACHE) an ImageNet-like JPEG tree: textured pictures with a
shape, about 500×375 (±25%), JPEG quality 90. Then times two-view MoCo v2 (aug-plus) batches at
``--size`` px from JPEG to normalised float views on the device:

- **sslgrid**: trainers/loader.py's StreamingBatches: DataLoader workers decode each file once (at
  the smallest DCT scale that still gives every crop its resolution) and cut both RandomResizedCrops
  from the original; colour, grayscale, blur and flip run batched on the device;
- **reference**: moco main_moco.py's loader: torchvision ImageFolder, TwoCropsTransform over PIL
  aug-plus (RandomResizedCrop(scale 0.2–1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale
  0.2, PIL GaussianBlur σ ~ U[0.1, 2] p 0.5, flip, ToTensor, Normalize), DataLoader with the same
  number of workers, batches moved to the device.

It also counts the decodes of each of 2 simulated ranks over one epoch (each must decode exactly
its half of every global batch). Prints images/s and the ratio.

    python bench/data_path.py [--images 1200] [--workers 2] [--batch 64] [--size 224] [--batches 15]
"""
from __future__ import annotations

import argparse
import time

import torch
from torchvision.datasets import ImageFolder

from augment import TwoViews, aug_plus  # bench/augment.py: moco's aug-plus and TwoCropsTransform, on PIL

from trainers import distributed as D
from trainers.augment import AugmentParams
from trainers.data import ensure_jpeg_tree, load_imagefolder
from trainers.loader import StreamingBatches, epoch_order, local_steps
from trainers.loop import epoch_generator


def reference_loader(root, size: int, batch: int, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    ds = ImageFolder(str(root), TwoViews(aug_plus(size)))  # moco: TwoCropsTransform over aug-plus
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin,
                                       drop_last=True, persistent_workers=workers > 0)


def time_batches(it, n: int, dev: torch.device, views_of) -> float:
    """Images per second over n batches after 2 of warm-up (worker start-up excluded)."""
    count, t0 = 0, None
    for i, batch in enumerate(it):
        views = views_of(batch)
        if i == 1:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, count = time.perf_counter(), 0
        elif i > 1:
            count += views[0].shape[0]
        if i == n + 1:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200, help="training images in the JPEG tree (>= 1000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--precision", default="bf16", help="the dtype the views are cast to, as autocast feeds them")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    t = time.perf_counter()
    root = ensure_jpeg_tree(args.images, 60, size=(500, 375))
    print(f"JPEG tree: {root} ({args.images} train images, ready in {time.perf_counter() - t:.1f} s)")
    data = load_imagefolder(root / "train", args.size)
    views = (AugmentParams(), AugmentParams())  # MoCo v2's aug-plus, both views

    ours = StreamingBatches(data.images.files, data.labels, views, args.size, 0, dev, workers=args.workers)
    order = epoch_order(len(data), epoch_generator(0, 0))
    steps = local_steps(order, args.batch)
    ours_ips = time_batches(ours.epoch(0, steps), args.batches, dev, lambda b: [v.to(dtype) for v in b[0]])
    ours.close()

    ref = reference_loader(root / "train", args.size, args.batch, args.workers, dev.type == "cuda")
    ref_ips = time_batches(iter(ref), args.batches, dev,
                           lambda b: [v.to(dev, non_blocking=True).to(dtype) for v in b[0]])

    # decodes per rank: 2 simulated ranks, one epoch each, decoding in the main process to count
    decodes = {}
    real_world = D.world
    try:
        for rank in range(2):
            D.world = lambda rank=rank: D.World(rank, 2)
            sb = StreamingBatches(data.images.files, data.labels, views, 32, 0, torch.device("cpu"), workers=0)
            for _ in sb.epoch(0, local_steps(order, args.batch)):
                pass
            decodes[rank] = sb.dataset.decodes
    finally:
        D.world = real_world
    share = (len(data) // args.batch) * args.batch // 2
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"two MoCo v2 views at {args.size} px, batch {args.batch}, {args.workers} workers, device {dev} ({card}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"sslgrid {ours_ips:8.1f} img/s   moco reference loader {ref_ips:8.1f} img/s   ratio {ours_ips / ref_ips:.2f}x")
    print(f"decodes per rank over one epoch, 2 ranks: {decodes[0]} and {decodes[1]} (each rank's share: {share}; "
          f"the old path decoded the whole global batch on every rank: {2 * share} each)")


if __name__ == "__main__":
    main()

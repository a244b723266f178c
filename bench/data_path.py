"""The streaming data path against moco's reference loader, side by side in one run, and JPEG
decoding in DataLoader workers against decoding on the GPU (``--decode``).

Writes once (and caches, in $SSLGRID_CACHE) an ImageNet-like JPEG tree: textured pictures with a
shape, about 500×375 (±25%), JPEG quality 90. Then times two-view MoCo v2 (aug-plus) batches at
``--size`` px from JPEG to normalised float views on the device:

- **sslgrid**: trainers/loader.py's StreamingBatches: DataLoader workers decode each file once (at
  the smallest DCT scale that still gives every crop its resolution) and cut both RandomResizedCrops
  from the original; colour, grayscale, blur and flip run batched on the device;
- **reference**: moco main_moco.py's loader: torchvision ImageFolder, TwoCropsTransform over PIL
  aug-plus (RandomResizedCrop(scale 0.2–1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale
  0.2, PIL GaussianBlur σ ~ U[0.1, 2] p 0.5, flip, ToTensor, Normalize), DataLoader with the same
  number of workers, batches moved to the device;
- with ``--decode``, **sslgrid decoding on the device** (``dataset.decode: cuda``, trainers/decode.py):
  the workers read bytes, the training process decodes each batch with torchvision's decode_jpeg
  on the device (nvJPEG on CUDA) and cuts the same crops there, at the same batch size.

Every rate is a steady state (bench/steady.py): the loader's prefetch queue (workers × prefetch
batches) is drained before the clock starts, and then at least ``--batches`` batches and
``--seconds`` seconds are timed. The tree is not made bigger for that: the epoch order is repeated
(a bench decodes the same file several times, from the page cache, as a second epoch would).
``--count-decodes`` also counts the decodes of each of 2 simulated ranks over one epoch (each must
decode exactly its half of every global batch). Prints images/s and the ratios.

    python bench/data_path.py [--images 1200] [--workers 2] [--batch 64] [--size 224] [--batches 15] [--decode]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench.augment import TwoViews, aug_plus  # noqa: E402  (moco's aug-plus and TwoCropsTransform, on PIL)
from bench.steady import Meter, Rate, Window, loader_warmup  # noqa: E402
from trainers import distributed as D  # noqa: E402
from trainers.augment import AugmentParams  # noqa: E402
from trainers.data import ensure_jpeg_tree, load_imagefolder  # noqa: E402
from trainers.loader import (SharedMemoryWarning, StreamingBatches, ThroughPipe, epoch_order, from_pipe,  # noqa: E402
                             local_steps, shm_free_bytes, shm_need)
from trainers.loop import Batches, epoch_generator  # noqa: E402

PREFETCH = 4  # StreamingBatches' default prefetch factor
REFERENCE_PREFETCH = 2  # torch DataLoader's default, which moco's loader keeps
MOCO_V2 = (AugmentParams(), AugmentParams())  # MoCo v2's aug-plus, both views


def repeated_steps(n: int, batch: int, count: int) -> list[torch.Tensor]:
    """``count`` steps of this rank's indices into a dataset of ``n``: the steps of epochs 0, 1, …
    (each its own order) one after the other, as many as ``count`` needs."""
    steps: list[torch.Tensor] = []
    epoch = 0
    while len(steps) < count:
        steps += local_steps(epoch_order(n, epoch_generator(0, epoch)), batch)
        epoch += 1
    return steps[:count]


def window(workers: int, prefetch: int, batches: int, seconds: float) -> Window:
    """A loader's window: its prefetch depth and 3 more skipped, then at least ``batches`` batches
    and ``seconds`` seconds, at most 20× the batches or 3× the seconds (and 5 s more)."""
    return Window(warmup=loader_warmup(workers, prefetch), min_batches=batches, min_seconds=seconds,
                  max_batches=20 * batches, max_seconds=3 * seconds + 5)


def stream_rate(batches: Batches, n: int, batch: int, win: Window, dtype: torch.dtype = torch.float32) -> Rate:
    """Images/s of ``batches`` (trainers/loop.py's Batches, e.g. StreamingBatches) over the
    repeated epoch order of ``n`` samples at ``batch``, each view cast to ``dtype`` as autocast
    would. The Batches object is closed afterwards."""
    steps = repeated_steps(n, batch, win.batches_needed)

    def consumed() -> Iterator[list[torch.Tensor]]:
        for views, _, _ in batches.epoch(0, steps):
            yield [v.to(dtype) for v in views]

    try:
        return Meter(win, size=lambda views: views[0].shape[0]).run(consumed())
    finally:
        batches.close()


def reference_rate(root: Path, size: int, batch: int, workers: int, win: Window, dev: torch.device,
                   dtype: torch.dtype) -> Rate:
    """Images/s of moco's loader (ImageFolder + TwoCropsTransform over PIL aug-plus, shuffled),
    batches moved to ``dev`` and cast to ``dtype``."""
    ds = ImageFolder(str(root), TwoViews(aug_plus(size)))  # moco: TwoCropsTransform over aug-plus
    sampler = torch.utils.data.RandomSampler(ds, num_samples=win.batches_needed * batch)  # repeats the epoch
    # two float views per image: where /dev/shm cannot hold the prefetch queue, through pipes (as ours)
    free, need = shm_free_bytes(), shm_need(workers, REFERENCE_PREFETCH, 2 * batch * 3 * size * size * 4)
    pipe = workers > 0 and free is not None and free < need
    if pipe:
        warnings.warn(f"/dev/shm has {free / 2**20:.0f} MiB free, and the moco loader's prefetch queue needs about "
                      f"{need / 2**20:.0f} MiB: its batches go through pipes", SharedMemoryWarning, stacklevel=2)
    collate = ThroughPipe(default_collate) if pipe else default_collate
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate, pin_memory=dev.type == "cuda" and not pipe,
                                         drop_last=True, persistent_workers=workers > 0,
                                         prefetch_factor=REFERENCE_PREFETCH if workers > 0 else None)

    def consumed() -> Iterator[list[torch.Tensor]]:
        for batch_ in loader:
            (v1, v2), _ = from_pipe(batch_, dev.type == "cuda") if pipe else batch_
            yield [v.to(dev, non_blocking=True).to(dtype) for v in (v1, v2)]

    return Meter(win, size=lambda views: views[0].shape[0]).run(consumed())


def bench_tree(images: int) -> Path:
    """The bench's JPEG tree of ``images`` training images (made once, cached)."""
    return ensure_jpeg_tree(images, 60, size=(500, 375))


def compare(root: Path, size: int, batch: int, workers: int, batches: int, seconds: float, dev: torch.device,
            dtype: torch.dtype) -> dict[str, Rate]:
    """sslgrid's streaming path against moco's loader: name → rate."""
    data = load_imagefolder(root / "train", size)
    ours = StreamingBatches(data.images.files, data.labels, MOCO_V2, size, 0, dev, workers=workers, prefetch=PREFETCH)
    out = {"sslgrid": stream_rate(ours, len(data), batch, window(workers, PREFETCH, batches, seconds), dtype)}
    out["moco_reference"] = reference_rate(root / "train", size, batch, workers,
                                           window(workers, REFERENCE_PREFETCH, batches, seconds), dev, dtype)
    return out


def decode_compare(root: Path, size: int, batch: int, workers: int, batches: int, seconds: float, dev: torch.device,
                   dtype: torch.dtype) -> dict[str, Rate]:
    """The streaming path decoding in its workers (PIL) against decoding on ``dev`` (decode_jpeg),
    at the same batch size and workers: name → rate."""
    data = load_imagefolder(root / "train", size)
    out = {}
    for name, on in (("workers_pil", None), (f"device_{dev.type}", dev)):
        sb = StreamingBatches(data.images.files, data.labels, MOCO_V2, size, 0, dev, workers=workers,
                              prefetch=PREFETCH, decode_on=on)
        out[name] = stream_rate(sb, len(data), batch, window(workers, PREFETCH, batches, seconds), dtype)
    return out


def count_decodes(root: Path, batch: int) -> dict[int, int]:
    """Files decoded by each of 2 simulated ranks over one epoch (in the main process, at 32 px)."""
    data = load_imagefolder(root / "train", 32)
    order = epoch_order(len(data), epoch_generator(0, 0))
    decodes = {}
    real_world = D.world
    try:
        for rank in range(2):
            D.world = lambda rank=rank: D.World(rank, 2)
            sb = StreamingBatches(data.images.files, data.labels, MOCO_V2, 32, 0, torch.device("cpu"), workers=0)
            for _ in sb.epoch(0, local_steps(order, batch)):
                pass
            decodes[rank] = sb.dataset.decodes
    finally:
        D.world = real_world
    return decodes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200, help="training images in the JPEG tree")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=15, help="at least this many timed batches (after the warm-up)")
    ap.add_argument("--seconds", type=float, default=5.0, help="and at least this many timed seconds")
    ap.add_argument("--precision", default="bf16", help="the dtype the views are cast to, as autocast feeds them")
    ap.add_argument("--decode", action="store_true", help="also decode on the device (dataset.decode: cuda)")
    ap.add_argument("--count-decodes", action="store_true", help="count each of 2 simulated ranks' decodes")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    t = time.perf_counter()
    root = bench_tree(args.images)
    print(f"JPEG tree: {root} ({args.images} train images, ready in {time.perf_counter() - t:.1f} s)")
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"two MoCo v2 views at {args.size} px, batch {args.batch}, {args.workers} workers, device {dev} ({card}), "
          f"torch threads {torch.get_num_threads()}")
    res = compare(root, args.size, args.batch, args.workers, args.batches, args.seconds, dev, dtype)
    ours, ref = res["sslgrid"], res["moco_reference"]
    print(f"sslgrid {ours.per_second:8.1f} img/s   moco reference loader {ref.per_second:8.1f} img/s   "
          f"ratio {ours.per_second / ref.per_second:.2f}x   ({ours.batches} and {ref.batches} batches timed after "
          f"{ours.warmup} and {ref.warmup} of warm-up)")
    if args.decode:
        dec = decode_compare(root, args.size, args.batch, args.workers, args.batches, args.seconds, dev, dtype)
        (a_name, a), (b_name, b) = dec.items()
        print(f"decode in workers (PIL) {a.per_second:8.1f} img/s   decode on {dev.type} (decode_jpeg) "
              f"{b.per_second:8.1f} img/s   ratio {b.per_second / a.per_second:.2f}x")
    if args.count_decodes:
        decodes = count_decodes(root, args.batch)
        share = (args.images // args.batch) * args.batch // 2
        print(f"decodes per rank over one epoch, 2 ranks: {decodes[0]} and {decodes[1]} (each rank's share: {share}; "
              f"the old path decoded the whole global batch on every rank: {2 * share} each)")


if __name__ == "__main__":
    main()

"""The training data path: each rank reads only its share of every global batch, and the views
a method asks for arrive on the device, augmented.

An epoch's sample order is one permutation, drawn from the epoch generator (trainers/loop.py), so
every rank knows the global batch of every step; rank r of W takes rows r, r+W, r+2W… of it
(interleaved, because that is how one process's SplitBatchNorm groups rows: W ranks with
bn_splits s normalise the same groups as one process with W·s). Every random number of a sample's
augmentation is keyed by (seed, epoch, sample index, view) (trainers/keyed.py), so W processes
reproduce one process with the same global batch, whichever rank or worker decodes a sample, and
a resumed run replays its epochs exactly.

Two sources behind one interface (:class:`Batches`):

- **in memory** (small data: the synthetic set, CIFAR-10, STL-10, small ImageFolders of S×S
  images): the uint8 array is indexed per step, and crop, colour and flip run batched on the
  device (trainers/augment.py);
- **streaming** (ImageNet-like JPEG trees): torch DataLoader workers (persistent, prefetching,
  pinned memory) decode each file once per step and cut every view's RandomResizedCrop from the
  **original** image with PIL, as torchvision does. A JPEG is decoded at the smallest DCT scale
  (PIL's ``draft``: 1/2, 1/4, 1/8) that still leaves every box at least the output resolution.
  Colour, blur and flip then run batched on the device.

Feature tensors (the cached linear probe) go through :class:`TensorBatches`, unaugmented.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers import distributed as D
from trainers.augment import DRAWS, AugmentParams, crop_boxes, geometry, photometric, to_device
from trainers.data import DataError, ImageSet, LazyImages, to_rgb
from trainers.keyed import uniforms

# inputs (one tensor per view, on the device), labels, dataset indices: this rank's rows of a step
Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]


def epoch_order(n: int, g: torch.Generator) -> torch.Tensor:
    """The epoch's sample order: a permutation of n drawn from the epoch generator."""
    return torch.randperm(n, generator=g)


def local_steps(order: torch.Tensor, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    """This rank's indices for each step of an epoch: rows rank, rank+W, … of each global batch of
    ``batch_size`` (the last, partial one kept unless ``drop_last``)."""
    w = D.world()
    n = order.shape[0]
    steps = n // batch_size if drop_last else math.ceil(n / batch_size)
    return [order[i * batch_size:(i + 1) * batch_size][w.rank::w.size] for i in range(steps)]


def default_workers(reserve: int = 1) -> int:
    """DataLoader workers per process: the CPUs this process was given (SLURM_CPUS_PER_TASK; else
    SSLGRID_CPUS, which pipeline sets from the stage's resources; else the CPUs it may run on,
    shared among LOCAL_WORLD_SIZE processes), minus ``reserve`` for the training loop (1 when it
    drives a GPU; 0 on a CPU, where the workers also do the colour part); from 1 to 16."""
    given = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SSLGRID_CPUS")
    if given:
        cpus = int(float(given))
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(cpus - reserve, 16))


def augmented_views(x: torch.Tensor, idx: torch.Tensor, epoch: int, seed: int, views: Sequence[AugmentParams],
                    size: int) -> list[torch.Tensor]:
    """Every view of uint8 originals x (b×3×H×W, on the device; idx: their dataset indices, CPU):
    crop, colour and flip with each sample's keyed draws. Normalised float b×3×size×size each."""
    out = []
    for v, p in enumerate(views):
        u = torch.from_numpy(uniforms(seed, epoch, idx.numpy(), v, DRAWS))
        out.append(photometric(geometry(x, u, p, size), u, p))
    return out


class TensorBatches:
    """Rows of a tensor (e.g. frozen features, N×C) as one unaugmented input."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device):
        self.inputs, self.labels, self.device = inputs, labels, device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def epoch(self, epoch: int, steps: Sequence[torch.Tensor]) -> Iterator[Batch]:
        for idx in steps:
            yield ([to_device(self.inputs[idx], self.device)], to_device(self.labels[idx], self.device),
                   to_device(idx, self.device))

    def close(self) -> None:
        pass


class InMemoryBatches:
    """Views of an in-memory uint8 array (N×3×H×W), cropped and coloured batched on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, views: Sequence[AugmentParams], size: int,
                 seed: int, device: torch.device):
        self.images, self.labels, self.views, self.size, self.seed, self.device = images, labels, views, size, seed, device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def epoch(self, epoch: int, steps: Sequence[torch.Tensor]) -> Iterator[Batch]:
        for idx in steps:
            x = to_device(self.images[idx], self.device)
            views = augmented_views(x, idx, epoch, self.seed, self.views, self.size)
            yield views, to_device(self.labels[idx], self.device), to_device(idx, self.device)

    def close(self) -> None:
        pass


class CropDataset(torch.utils.data.Dataset):
    """Item (epoch, i): file i decoded once and cut into one uint8 S×S×3 crop per view, each drawn on
    the original's size (RandomResizedCrop's box) and resized by PIL as torchvision's
    RandomResizedCrop does on a PIL image (crop, then bilinear resize with antialiasing). When the
    smallest box is at least twice the output side, the JPEG is decoded at a reduced DCT scale that
    still gives every box the output resolution, and the box is resized from there.

    ``native`` data (every image S×S, its own original) is returned whole instead, so that the
    crops are cut on the device exactly as for the same data in memory."""

    def __init__(self, files: Sequence, labels: torch.Tensor, views: Sequence[AugmentParams], size: int, seed: int,
                 native: bool = False):
        self.files, self.labels, self.views, self.size, self.seed = list(files), labels, list(views), size, seed
        self.native = native
        self.decodes = 0  # files decoded by this process (a worker's own copy): bench/data_path.py counts them

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[np.ndarray], int, int, int]:
        epoch, i = key
        path = self.files[i]
        try:
            with Image.open(path) as im:
                if self.native:
                    crops = [np.asarray(to_rgb(im, path))]
                else:
                    crops = self._crops(im, epoch, i, path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot be read as an image ({err}). Remove or replace this file.") from err
        self.decodes += 1
        return crops, int(self.labels[i]), i, epoch

    def _crops(self, im: Image.Image, epoch: int, i: int, path: Path) -> list[np.ndarray]:
        w, h = im.size
        boxes = [crop_boxes(uniforms(self.seed, epoch, [i], v, 22), h, w, p.crop_scale, p.crop_ratio)[0].tolist()
                 for v, p in enumerate(self.views)]
        # the decode scale that still gives every box the output resolution in both directions
        need = max(max(self.size / (b[2] - b[0]), self.size / (b[3] - b[1])) for b in boxes)
        if need <= 0.5:
            im.draft("RGB", (math.ceil(w * need), math.ceil(h * need)))
        im = to_rgb(im, path)
        size = (self.size, self.size)
        if im.size == (w, h):  # torchvision's F.resized_crop on a PIL image: crop, then resize
            return [np.asarray(im.crop(tuple(int(v) for v in b)).resize(size, Image.Resampling.BILINEAR))
                    for b in boxes]
        sx, sy = im.size[0] / w, im.size[1] / h
        return [np.asarray(im.resize(size, Image.Resampling.BILINEAR, box=(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)))
                for b in boxes]


class _StepSampler(torch.utils.data.Sampler):
    """Yields this rank's (epoch, index) lists, one per step, for the epoch last set."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, int]]] = []

    def set(self, epoch: int, steps: Sequence[torch.Tensor]) -> None:
        self.steps = [[(epoch, int(i)) for i in idx] for idx in steps]

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def _collate(items: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crops → one uint8 V×b×3×S×S tensor, filled once from the H×W×C arrays (channels_last
    strides, which every operation after it accepts)."""
    views, size = len(items[0][0]), items[0][0][0].shape[0]
    batch = torch.empty((views, len(items), size, size, 3), dtype=torch.uint8)
    arr = batch.numpy()
    for j, it in enumerate(items):
        for v in range(views):
            arr[v, j] = it[0][v]
    crops = batch.permute(0, 1, 4, 2, 3)  # V×b×3×S×S
    return crops, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


class _ColourCollate:
    """Collation that also runs the photometric part, batched, in the worker (for a CPU device,
    where the training process has no spare cores to do it): float V×b×3×S×S views."""

    def __init__(self, views: Sequence[AugmentParams], seed: int):
        self.views, self.seed = list(views), seed

    def __call__(self, items: list[tuple]):
        crops, y, idx = _collate(items)
        epoch = items[0][3]
        out = [photometric(crops[v], torch.from_numpy(uniforms(self.seed, epoch, idx.numpy(), v, DRAWS)), p)
               for v, p in enumerate(self.views)]
        return out, y, idx


class StreamingBatches:
    """Views decoded from files by DataLoader workers. The colour part runs batched on the device
    when it is a GPU, and in the workers (in the collate function) when it is the CPU."""

    def __init__(self, files: Sequence, labels: torch.Tensor, views: Sequence[AugmentParams], size: int, seed: int,
                 device: torch.device, workers: int | None = None, prefetch: int = 4, native: bool = False):
        self.labels, self.views, self.size, self.seed, self.device = labels, list(views), size, seed, device
        self.native = native
        self.dataset = CropDataset(files, labels, views, size, seed, native)
        self.sampler = _StepSampler()
        workers = default_workers(reserve=int(device.type == "cuda")) if workers is None else workers
        self.colour_in_workers = device.type == "cpu" and workers > 0 and not native
        kw = dict(persistent_workers=True, prefetch_factor=prefetch) if workers > 0 else {}
        collate = _ColourCollate(views, seed) if self.colour_in_workers else _collate
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  collate_fn=collate, pin_memory=device.type == "cuda", **kw)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def epoch(self, epoch: int, steps: Sequence[torch.Tensor]) -> Iterator[Batch]:
        # a step may give this rank no rows (a last partial batch smaller than the processes, kept by
        # the probe): no worker can collate nothing, so such a step gets an empty batch here, in its
        # place, and the rank still takes the step with the others
        self.sampler.set(epoch, [s for s in steps if len(s)])
        batches = iter(self.loader)
        for s in steps:
            if not len(s):
                yield ([torch.empty((0, 3, self.size, self.size), device=self.device) for _ in self.views],
                       torch.empty(0, dtype=torch.int64, device=self.device),
                       torch.empty(0, dtype=torch.int64, device=self.device))
                continue
            crops, y, idx = next(batches)
            if self.colour_in_workers:
                views = list(crops)
            elif self.native:  # whole images: crop and colour on the device, as for the same data in memory
                x = crops[0].contiguous().to(self.device, non_blocking=True)
                views = augmented_views(x, idx, epoch, self.seed, self.views, self.size)
            else:
                views = []
                for v, p in enumerate(self.views):
                    u = torch.from_numpy(uniforms(self.seed, epoch, idx.numpy(), v, DRAWS))
                    x = crops[v].to(self.device, non_blocking=True).float().div_(255)
                    views.append(photometric(x, u, p))
            yield views, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        next(batches, None)  # run the loader's iterator to its end, as a for loop over it would

    def close(self) -> None:
        # persistent workers end with the loader's iterator; drop it so they exit now
        self.loader = None


def image_batches(data: ImageSet, views: Sequence[AugmentParams], size: int, seed: int, device: torch.device,
                  workers: int | None = None) -> InMemoryBatches | StreamingBatches:
    """The training batches of ``data``: in memory when its images are a tensor, else streamed from
    its files by DataLoader workers (``workers``: None for :func:`default_workers`)."""
    if isinstance(data.images, LazyImages):
        return StreamingBatches(data.images.files, data.labels, views, size, seed, device, workers,
                                native=data.images.native)
    return InMemoryBatches(data.images, data.labels, views, size, seed, device)


@dataclass
class Shard:
    """This rank's contiguous share of range(n): [start, stop)."""

    start: int
    stop: int

    @staticmethod
    def of(n: int) -> "Shard":
        w = D.world()
        per = math.ceil(n / w.size)
        return Shard(min(n, w.rank * per), min(n, (w.rank + 1) * per))

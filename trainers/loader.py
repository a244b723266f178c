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
  Colour, blur and flip then run batched on the device. With ``dataset.decode: cuda`` the workers
  only read the files' bytes, and the training process decodes each batch on its GPU and cuts the
  same crops there (trainers/decode.py).

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
from trainers.augment import DRAWS, AugmentParams, geometry, photometric, to_device
from trainers.data import DataError, ImageSet, LazyImages, to_rgb
from trainers.decode import FileBytes, collate_bytes, decode_crops, view_boxes
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
        boxes = [view_boxes(self.seed, epoch, np.array([i]), v, p, h, w)[0].tolist() for v, p in enumerate(self.views)]
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


# Margin on /dev/shm's estimated use: tensors of the batch the training process is copying out, and
# allocator rounding, beside the batches in flight.
SHM_MARGIN = 1.5


class SharedMemoryWarning(UserWarning):
    """/dev/shm is smaller than the DataLoader's prefetch depth needs; batches go through pipes."""


def shm_free_bytes() -> int | None:
    """Free bytes of /dev/shm, where DataLoader workers put every tensor they return (both of
    torch.multiprocessing's sharing strategies, file_descriptor and file_system, allocate there with
    shm_open); None where there is no /dev/shm."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def shm_need(workers: int, prefetch: int, batch_bytes: int) -> int:
    """Bytes of /dev/shm a DataLoader's prefetch queue can hold: workers × prefetch batches, × SHM_MARGIN."""
    return int(workers * prefetch * batch_bytes * SHM_MARGIN)


def _size(n: float) -> str:
    """Bytes as MiB or GiB, for messages."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _to_numpy(obj):
    """A batch with its tensors as numpy arrays, which a worker's result queue pickles through its
    pipe instead of placing them in shared memory."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(o) for o in obj)
    return obj


def from_pipe(obj, pin: bool):
    """A batch that came through a pipe (``ThroughPipe``) with its numpy arrays as tensors again,
    pinned when ``pin`` (so the copy to the device does not wait)."""
    if isinstance(obj, np.ndarray):
        t = torch.from_numpy(obj)
        return t.pin_memory() if pin else t
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_pipe(o, pin) for o in obj)
    return obj


class ThroughPipe:
    """A collate function whose batches leave the worker as numpy arrays (``_to_numpy``), which its
    result queue pickles through a pipe: no /dev/shm. ``from_pipe`` turns them back into tensors."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple]):
        return _to_numpy(self.collate(items))


class StreamingBatches:
    """Views decoded from files by DataLoader workers. The colour part runs batched on the device
    when it is a GPU, and in the workers (in the collate function) when it is the CPU.

    ``decode_on``: None, the workers decode each file with PIL and cut its crops (``CropDataset``);
    a device, the workers only read the files' bytes and the training process decodes each batch on
    that device and cuts the crops there (trainers/decode.py; ``dataset.decode: cuda`` passes the
    training device, tests pass the CPU). ``dataset``: the dataset the workers read, in place of the
    one ``decode_on`` chooses (the throttled loader of tests/unit/test_steady.py).

    Before the workers start (the first epoch), the bytes the prefetch queue can hold in /dev/shm
    (workers × prefetch batches) are compared with its free space; when they do not fit, the
    batches are sent through the workers' pipes instead, with a SharedMemoryWarning that gives the
    numbers: a full /dev/shm kills the workers with SIGBUS."""

    def __init__(self, files: Sequence, labels: torch.Tensor, views: Sequence[AugmentParams], size: int, seed: int,
                 device: torch.device, workers: int | None = None, prefetch: int = 4, native: bool = False,
                 decode_on: torch.device | None = None, dataset: torch.utils.data.Dataset | None = None):
        self.labels, self.views, self.size, self.seed, self.device = labels, list(views), size, seed, device
        self.native, self.decode_on = native, decode_on
        if decode_on is not None and native:
            raise ValueError("decoding on the device applies to ImageFolders of originals, not to native (S×S) data")
        if dataset is None:
            dataset = (FileBytes(files, labels) if decode_on is not None
                       else CropDataset(files, labels, views, size, seed, native))
        self.dataset = dataset
        self.files = getattr(dataset, "files", None) or list(files)  # one list of (maybe a million) paths
        self.sampler = _StepSampler()
        self.workers = default_workers(reserve=int(device.type == "cuda")) if workers is None else workers
        self.prefetch = prefetch if self.workers > 0 else None
        self.colour_in_workers = device.type == "cpu" and self.workers > 0 and not native and decode_on is None
        if decode_on is not None:
            self.collate = collate_bytes
        else:
            self.collate = _ColourCollate(views, seed) if self.colour_in_workers else _collate
        self.through_pipe = False
        self.loader: torch.utils.data.DataLoader | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch_bytes(self, rows: int) -> int:
        """Bytes of one batch of ``rows`` samples as a worker returns it (an estimate for JPEG bytes:
        the mean size of up to 32 of the files)."""
        if self.decode_on is not None:
            sample = self.files[:: max(1, len(self.files) // 32)][:32]
            per = int(np.mean([os.path.getsize(f) for f in sample])) if sample else 0
        elif self.native:
            per = 3 * self.size * self.size
        else:
            per = len(self.views) * 3 * self.size * self.size * (4 if self.colour_in_workers else 1)
        return rows * (per + 16)

    def _make_loader(self, rows: int) -> torch.utils.data.DataLoader:
        collate = self.collate
        if self.workers > 0:
            need = shm_need(self.workers, self.prefetch, self.batch_bytes(rows))
            free = shm_free_bytes()
            if free is not None and free < need:
                import warnings

                self.through_pipe = True
                collate = ThroughPipe(collate)
                warnings.warn(
                    f"/dev/shm has {_size(free)} free, and the DataLoader's prefetch queue needs about "
                    f"{_size(need)} there ({self.workers} workers × prefetch {self.prefetch} × "
                    f"{_size(self.batch_bytes(rows))} per batch of {rows}, × {SHM_MARGIN} margin): the "
                    f"workers would die with SIGBUS once it is full. Their batches now go through pipes instead "
                    f"(one more copy per batch). Enlarge /dev/shm (docker run --shm-size) or lower "
                    f"dataset.workers to keep shared memory.", SharedMemoryWarning, stacklevel=3)
        kw = dict(persistent_workers=True, prefetch_factor=self.prefetch) if self.workers > 0 else {}
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
                                           collate_fn=collate, pin_memory=self.device.type == "cuda", **kw)

    def epoch(self, epoch: int, steps: Sequence[torch.Tensor]) -> Iterator[Batch]:
        # a step may give this rank no rows (a last partial batch smaller than the processes, kept by
        # the probe): no worker can collate nothing, so such a step gets an empty batch here, in its
        # place, and the rank still takes the step with the others
        self.sampler.set(epoch, [s for s in steps if len(s)])
        if self.loader is None:
            self.loader = self._make_loader(max((len(s) for s in steps), default=1))
        batches = iter(self.loader)
        pin = self.device.type == "cuda"
        for s in steps:
            if not len(s):
                yield ([torch.empty((0, 3, self.size, self.size), device=self.device) for _ in self.views],
                       torch.empty(0, dtype=torch.int64, device=self.device),
                       torch.empty(0, dtype=torch.int64, device=self.device))
                continue
            batch = next(batches)
            if self.through_pipe:
                batch = from_pipe(batch, pin)
            if self.decode_on is not None:
                payloads, is_jpeg, y, idx = batch
                crops = decode_crops(payloads, is_jpeg, idx, epoch, self.seed, self.views, self.size, self.decode_on,
                                     self.files)
                views = [photometric(c.to(self.device, non_blocking=True), _draws(self.seed, epoch, idx, v), p)
                         for v, (c, p) in enumerate(zip(crops, self.views))]
                yield views, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
                continue
            crops, y, idx = batch
            if self.colour_in_workers:
                views = list(crops)
            elif self.native:  # whole images: crop and colour on the device, as for the same data in memory
                x = crops[0].contiguous().to(self.device, non_blocking=True)
                views = augmented_views(x, idx, epoch, self.seed, self.views, self.size)
            else:
                views = []
                for v, p in enumerate(self.views):
                    x = crops[v].to(self.device, non_blocking=True).float().div_(255)
                    views.append(photometric(x, _draws(self.seed, epoch, idx, v), p))
            yield views, y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        next(batches, None)  # run the loader's iterator to its end, as a for loop over it would

    def close(self) -> None:
        # persistent workers end with the loader's iterator; drop it so they exit now
        self.loader = None


def _draws(seed: int, epoch: int, idx: torch.Tensor, view: int) -> torch.Tensor:
    """The keyed uniforms (b×DRAWS, CPU) of a batch's samples for one view."""
    return torch.from_numpy(uniforms(seed, epoch, idx.numpy(), view, DRAWS))


DECODERS = ("cpu", "cuda")  # dataset.decode: where a streamed ImageFolder's JPEGs are decoded


def image_batches(data: ImageSet, views: Sequence[AugmentParams], size: int, seed: int, device: torch.device,
                  workers: int | None = None, decode: str = "cpu") -> InMemoryBatches | StreamingBatches:
    """The training batches of ``data``: in memory when its images are a tensor, else streamed from
    its files by DataLoader workers (``workers``: None for :func:`default_workers`). ``decode``
    (``dataset.decode``): ``cpu``, the workers decode (PIL); ``cuda``, the training process decodes
    each batch on its GPU (trainers/decode.py). Raises ValueError, naming the field and the fix, for
    ``cuda`` without a CUDA device or for data that is not a streamed ImageFolder of originals."""
    if decode not in DECODERS:
        raise ValueError(f"dataset.decode = {decode!r}: valid values are {', '.join(DECODERS)}")
    streamed = isinstance(data.images, LazyImages)
    if decode == "cuda":
        if not streamed or data.images.native:
            raise ValueError("dataset.decode = 'cuda' applies to streamed ImageFolders of originals (e.g. ImageNet "
                             "JPEGs); this dataset is decoded once, into memory. Set dataset.decode: cpu")
        if device.type != "cuda":
            raise ValueError(f"dataset.decode = 'cuda', but this stage runs on {device} (torch.cuda.is_available() is "
                             f"{torch.cuda.is_available()}): give the stage a GPU (resources.<stage>.gpus) or set "
                             f"dataset.decode: cpu")
    if streamed:
        return StreamingBatches(data.images.files, data.labels, views, size, seed, device, workers,
                                native=data.images.native, decode_on=device if decode == "cuda" else None)
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

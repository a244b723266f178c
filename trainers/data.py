"""Datasets as uint8 image tensors, so augmentation can run batched (on the GPU when present).

Every dataset is exposed as a :class:`ImageSet`: ``images`` (N×3×H×W uint8), ``labels`` (N int64)
and ``classes``. Small data (the synthetic default, CIFAR-10, STL-10, small ImageFolder trees) is
decoded once into memory; that is what the 2-core quickstart needs. Decoding happens here, once per
stage, and every epoch after that only indexes a tensor.

The embedded default is a deterministic synthetic set: one coloured shape per image on a two-colour
gradient background, the class given by the shape, so that colour is a nuisance an SSL method must
learn to ignore. It is written once as a real ImageFolder tree (``train/<class>/*.png``,
``val/<class>/*.png``) in the cache directory, so the same reader serves it and user data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainers import fashion_mnist
from trainers.files import atomic_write
from trainers.folders import (IMAGE_EXTENSIONS, DataError, _names, class_folders,  # noqa: F401  (re-exported)
                              image_files, imagefolder_classes)

if TYPE_CHECKING:
    from pipeline.spec import DatasetSpec

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
SYNTHETIC_VERSION = 2


class LazyImages:
    """N×3×S×S uint8 images in the evaluation view, decoded on demand: ``lazy[idx]`` (a tensor of
    indices or a slice) decodes just those files, in a thread pool sized to the machine (PIL
    releases the GIL while decoding). Used for ImageFolder trees too large, or too varied in size,
    to hold in memory, such as ImageNet; training reads the same files through trainers/loader.py,
    which crops the originals."""

    def __init__(self, files: list[Path], image_size: int, workers: int | None = None, native: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.files, self.image_size, self.native = files, image_size, native
        self.shape = (len(files), 3, image_size, image_size)
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self.files)))
        elif isinstance(idx, torch.Tensor):
            idx = idx.tolist()
        arrays = list(self.pool.map(lambda i: _load_image(self.files[i], self.image_size, self.native), idx))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __getstate__(self) -> dict:  # DataLoader workers get the file list, not the thread pool
        return {"files": self.files, "image_size": self.image_size, "native": self.native}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["files"], state["image_size"], workers=1, native=state["native"])


IN_MEMORY_BYTES = 4 * 2**30  # decoded size above which an ImageFolder is read lazily


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor | LazyImages  # N×3×H×W uint8
    labels: torch.Tensor  # N int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def cache_dir() -> Path:
    """``$SSLGRID_CACHE``, else ``~/.cache/sslgrid``."""
    return Path(os.environ.get("SSLGRID_CACHE", Path.home() / ".cache" / "sslgrid"))


# --------------------------------------------------------------------------------------------
# Synthetic shapes


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n):
            a = angle + offset + 2 * math.pi * i / n
            rr = radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "diamond":  # a tall rhombus, distinct from a rotated square by its aspect
        pts = ring(4, [r, 0.55 * r])
        return pts
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "star":
        return ring(10, [r, 0.45 * r], -math.pi / 2)
    if shape == "cross":
        w = 0.36 * r
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(shape)


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours, far enough apart that the shape stays visible."""
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if np.abs(fg - bg).sum() > 180:
            return fg, bg


def render_shape(shape: str, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """One image: a shape that fills most of the frame (radius 0.3–0.45 of the side), with random
    colour, rotation and position, on a random solid background.

    No per-pixel noise, and no background gradient: a noise texture lets instance discrimination
    succeed by memorising it, and a gradient's direction survives crops and colour jitter, so it
    competes with the shape as the cue that matches two views (version 1 had gradients; measured
    in the quickstart calibration, see the closing note of the spine issue)."""
    big = size * supersample
    fg, bg = _distinct_colours(rng)
    img = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.30, 0.45) * big
    cx = rng.uniform(r * 0.8, big - r * 0.8)
    cy = rng.uniform(r * 0.8, big - r * 0.8)
    angle = rng.uniform(0, 2 * math.pi)
    colour = tuple(int(v) for v in fg)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def synthetic_root(num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    params = {"v": SYNTHETIC_VERSION, "train": num_train, "val": num_val, "size": image_size, "seed": seed,
              "shapes": SHAPES}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "data" / f"shapes-{image_size}px-{digest}"


def ensure_synthetic(num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Generate the synthetic ImageFolder tree once; later calls return the cached root.

    Written to a temporary folder and renamed into place, so concurrent stages and a crash mid-way
    never leave a half-written tree behind."""
    root = synthetic_root(num_train, num_val, image_size, seed)
    if (root / "DONE").exists():
        return root
    with atomic_write(root, folder=True) as tmp:  # another process may publish the identical tree first
        for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            rng = np.random.default_rng(split_seed)
            for cls in SHAPES:
                (tmp / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cls = SHAPES[i % len(SHAPES)]
                render_shape(cls, image_size, rng).save(tmp / split / cls / f"{i:06d}.png")
        (tmp / "DONE").write_text(json.dumps({"train": num_train, "val": num_val, "size": image_size}))
    return root


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An h×w×3 uint8 picture with texture at every scale: octaves of smooth noise (bilinear
    upsampling of random grids of 4 to 256 cells) and per-pixel grain, so JPEG sizes and decode costs are photo-like."""
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90.0), (16, 50.0), (64, 30.0), (256, 18.0)):
        grid = rng.uniform(-1, 1, size=(max(2, cells * h // max(w, h)), cells, 3)).astype(np.float32)
        layer = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        out += (np.asarray(layer, np.float32) / 127.5 - 1) * amp
    out += rng.uniform(0, 255, size=3).astype(np.float32)[None, None] * 0.5 + 64
    out += rng.normal(0, 10, size=(h, w, 1)).astype(np.float32)  # grain: photo-like JPEG sizes (~100 kB)
    return np.clip(out, 0, 255).astype(np.uint8)


def _jpeg_image(args: tuple[Path, int, int, tuple[int, int], float, int]) -> None:
    """Image i of a split of the JPEG tree, from its own seed (so that a process pool can write them)."""
    path, split_seed, i, size, jitter, quality = args
    rng = np.random.default_rng([split_seed, i])
    cls = SHAPES[i % len(SHAPES)]
    w = int(size[0] * rng.uniform(1 - jitter, 1 + jitter))
    h = int(size[1] * rng.uniform(1 - jitter, 1 + jitter))
    img = Image.fromarray(_texture(rng, w, h))
    side = int(min(w, h) * rng.uniform(0.4, 0.8))
    shape = render_shape(cls, side, rng, supersample=2)
    mask = Image.fromarray((np.abs(np.asarray(shape, np.int16) - np.asarray(shape, np.int16)[0, 0]).sum(2)
                            > 30).astype(np.uint8) * 255)
    img.paste(shape, (int(rng.uniform(0, w - side)), int(rng.uniform(0, h - side))), mask)
    img.save(path / cls / f"{i:06d}.jpg", quality=quality)


def ensure_jpeg_tree(num_train: int, num_val: int, seed: int = 0, size: tuple[int, int] = (500, 375),
                     jitter: float = 0.25, quality: int = 90) -> Path:
    """An ImageNet-like ImageFolder of JPEGs, written once into the cache: the synthetic shapes
    (one class per shape) drawn over a textured picture whose width and height vary by ±``jitter``
    around ``size`` (pixels; ImageNet's median is about 500×375), saved at JPEG ``quality``, about
    80 kB each at 500×375. For the benches and tests of the streaming data path; written by a
    process pool, atomically (temporary folder, then rename); returns the root (train/ and val/)."""
    from concurrent.futures import ProcessPoolExecutor

    params = {"train": num_train, "val": num_val, "seed": seed, "size": size, "jitter": jitter, "q": quality}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_dir() / "data" / f"jpeg-{size[0]}x{size[1]}-{digest}"
    if (root / "DONE").exists():
        return root
    with atomic_write(root, folder=True) as tmp:  # another process may publish the identical tree first
        jobs = []
        for split, n, split_seed in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            for cls in SHAPES:
                (tmp / split / cls).mkdir(parents=True, exist_ok=True)
            jobs += [(tmp / split, split_seed, i, size, jitter, quality) for i in range(n)]
        workers = min(len(jobs) // 64 + 1, os.cpu_count() or 1)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_jpeg_image, jobs, chunksize=16))
        else:
            for job in jobs:
                _jpeg_image(job)
        (tmp / "DONE").write_text(json.dumps(params))
    return root


# --------------------------------------------------------------------------------------------
# ImageFolder


def eval_resize(image_size: int) -> int:
    """The shorter side the evaluation view resizes to before its centre crop: moco main_lincls's
    Resize(256) + CenterCrop(224), scaled to ``image_size`` (pixels)."""
    return round(image_size * 256 / 224)


def to_rgb(im: Image.Image, path: Path | str = "") -> Image.Image:
    """An opened image of any PIL mode as 8-bit RGB, its values on the 0–255 scale it was stored on.

    PIL's ``convert("RGB")`` (torchvision's default loader) clips 16-bit pixels at 255: a 16-bit
    greyscale PNG at mid-grey (32768) becomes white. So 16-bit modes (``I;16*``) are scaled by
    255/65535 first; LAB goes through a colour transform (ImageCms; ``convert`` copies channels);
    every other mode PIL can read (1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, HSV) converts
    as torchvision does. Raises DataError naming the file for 32-bit integer (``I``, except from a
    PNG, whose 16-bit greyscale older PIL versions read as ``I``) and float (``F``) pixels, whose
    range no file states."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I" and im.format == "PNG":  # PNG holds at most 16 bits; older PIL reads them as I
        grey = (np.asarray(im).astype(np.uint32) * 255 + 32767) // 65535  # round(v · 255/65535)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        raise DataError(f"{path}: {'32-bit integer' if mode == 'I' else 'floating-point'} pixels (PIL mode {mode}) "
                        f"have no stated 0–255 range. Convert this file to 8- or 16-bit (e.g. PNG), or remove it.")
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("LAB"),
                                                              ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, lab_to_srgb)
    if mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight forms
        im = im.convert("LA" if mode == "La" else "RGBA")
    return im.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """An image file as PIL RGB (``to_rgb``), or a DataError that names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im, path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}). Remove or replace this file.") from err


def eval_image(im: Image.Image, image_size: int, native: bool = False) -> Image.Image:
    """The evaluation view of an RGB image: torchvision's Resize(eval_resize(S)) + CenterCrop(S), moco
    main_lincls's val transform at S = 224, for every image of an ImageFolder; the image as it is for
    a ``native`` dataset, whose images all are S×S already (the synthetic set; CIFAR and STL are
    tensors and never come here), as solo-learn and moco's CIFAR demo evaluate CIFAR."""
    if native and im.size == (image_size, image_size):
        return im
    import torchvision.transforms.functional as TF

    return TF.center_crop(TF.resize(im, eval_resize(image_size), interpolation=TF.InterpolationMode.BILINEAR),
                          image_size)


def _load_image(path: Path, image_size: int, native: bool = False) -> np.ndarray:
    """One file in the evaluation view (``eval_image``), H×W×3 uint8; DataError names a bad file."""
    try:
        with Image.open(path) as im:
            # a JPEG much larger than the view is decoded at a reduced DCT scale, still >= 2x the resize
            short = min(im.size)
            target = eval_resize(image_size)
            if short > 4 * target:  # DCT scaling to >= 2x the target, so the resize still filters (antialias)
                im.draft("RGB", (math.ceil(im.size[0] * 2 * target / short), math.ceil(im.size[1] * 2 * target / short)))
            return np.asarray(eval_image(to_rgb(im, path), image_size, native), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot be read as an image ({err}). Remove or replace this file.") from err


def load_imagefolder(split_root: Path, image_size: int, max_items: int | None = None,
                     in_memory: bool | None = None, native: bool = False,
                     classes: Sequence[str] | None = None) -> ImageSet:
    """Read ``split_root/<class>/**/<image>``; labels index ``classes`` (default: this split's own
    class folders; ``load_split`` passes train's, shared by every split, from ``imagefolder_classes``).

    A ``native`` dataset (the synthetic set: every image S×S, its own original) is decoded into
    memory (``images`` a uint8 N×3×S×S tensor) when it takes under 4 GiB, or when ``in_memory``;
    training crops these arrays, and evaluation takes them as they are.

    Any other ImageFolder (user data, e.g. ImageNet) is streamed by default: ``images`` is a
    :class:`LazyImages` in the evaluation view (Resize + CenterCrop), and training crops the decoded
    originals in DataLoader workers (trainers/loader.py), as torchvision's RandomResizedCrop does.
    ``in_memory: true`` stores the evaluation view instead and trains on crops of it: smaller, but
    the crop cannot reach the border the centre crop cut (a different result, so the field is part of
    such a stage's identity). Raises DataError naming the folder or file at fault."""
    split_root = Path(split_root)
    if not split_root.is_dir():
        raise DataError(f"{split_root}: no such folder. An ImageFolder dataset needs <root>/train/<class>/ "
                        f"and <root>/val/<class>/ (set dataset.root).")
    own = class_folders(split_root)
    if classes is None:
        classes = own
    elif tuple(classes) != own:
        raise DataError(f"{split_root}: its class folders {_names(list(own))} differ from train's {_names(list(classes))}."
                        f" Every split needs the same class folders.")
    classes = tuple(classes)
    if not classes:
        raise DataError(f"{split_root}: no class folders inside. Expected {split_root}/<class>/<image files>.")
    files: list[tuple[Path, int]] = []
    for ci, cls in enumerate(classes):
        found = image_files(split_root / cls)
        if not found:
            raise DataError(f"{split_root / cls}: no image files ({', '.join(IMAGE_EXTENSIONS)}). Add images or "
                            f"remove this class folder from every split.")
        files += [(f, ci) for f in found]
    if max_items is not None and len(files) > max_items:
        # keep the class balance when subsampling: take every n-th file
        step = len(files) / max_items
        files = [files[int(i * step)] for i in range(max_items)]
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    if in_memory is None:
        in_memory = native and len(files) * 3 * image_size * image_size <= IN_MEMORY_BYTES
    if not in_memory:
        return ImageSet(LazyImages([f for f, _ in files], image_size, native=native), labels, classes)
    arr = np.stack([_load_image(f, image_size, native) for f, _ in files])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, labels, classes)


def _from_torchvision(name: str, root: Path, train: bool, download: bool) -> ImageSet:
    import torchvision

    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
            arr, labels, classes = ds.data, ds.targets, ds.classes
        elif name == "stl10":
            ds = torchvision.datasets.STL10(str(root), split="train" if train else "test", download=download)
            arr, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, ds.classes
        else:
            raise ValueError(name)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        raise DataError(f"{root}: {name} is not there ({err}). Put it there or set dataset.download: true.") from err
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(labels, dtype=torch.int64), tuple(classes))


def load_split(ds: DatasetSpec, split: str) -> ImageSet:
    """``split`` ("train" or "val") of the dataset ``ds`` describes: images N×3×S×S uint8 (S =
    ``ds.image_size``; a LazyImages for a streamed ImageFolder), labels N int64. ``max_train`` /
    ``max_val`` subsample an ImageFolder (every n-th file) and CIFAR/STL/Fashion-MNIST (the first
    n); the synthetic set is generated at ``num_train`` / ``num_val`` instead. Fashion-MNIST's val
    split is its official test split (10,000 images), upsampled from 28 px to S
    (trainers/fashion_mnist.py). Raises ValueError for another split, and DataError naming the
    folder or file for data that cannot be read (for Fashion-MNIST, the fix: install
    dataset-fashion-mnist or set dataset.root)."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r}: load_split reads 'train' or 'val'")
    size = ds.image_size
    limit = ds.max_train if split == "train" else ds.max_val
    if ds.name == "synthetic":
        root = ensure_synthetic(ds.num_train, ds.num_val, size, ds.seed)
        return load_imagefolder(root / split, size, in_memory=ds.in_memory, native=True,
                                classes=imagefolder_classes(root))
    if ds.name == "imagefolder":
        root = Path(ds.root).expanduser()
        return load_imagefolder(root / split, size, limit, ds.in_memory, classes=imagefolder_classes(root))
    if ds.name == "fashion_mnist":  # Debian's files, upsampled from 28 px
        images, labels, classes = fashion_mnist.load(ds.root, split == "train", size, cache_dir(), limit)
        return ImageSet(images, labels, classes)
    if ds.name in ("cifar10", "stl10"):
        data = _from_torchvision(ds.name, Path(ds.root), split == "train", ds.download)
        if limit is not None and len(data) > limit:
            data = ImageSet(data.images[:limit], data.labels[:limit], data.classes)
        return data
    raise DataError(f"unknown dataset {ds.name!r}")

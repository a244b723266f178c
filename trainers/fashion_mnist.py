"""Fashion-MNIST: 70,000 real 28×28 grey photographs of clothing in 10 classes (Xiao, Rasul &
Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv 1708.07747; © Zalando SE, MIT licence). 60,000 training images and the official
10,000 test images (1,000 per class), which sslgrid uses as the val split.

Debian's ``dataset-fashion-mnist`` package installs the four idx files, gzipped, under
/usr/share/datasets/fashion-mnist/ (the default root). Debian recompressed them, so their md5 differs
from torchvision's list and ``FashionMNIST(download=True)`` rejects them and tries the network.
They are therefore unzipped once into the sslgrid cache, in torchvision's layout
(``<cache>/data/fashion-mnist-<digest>/FashionMNIST/raw/<name>``), and read with
``torchvision.datasets.FashionMNIST(root, download=False)``.

Nothing here imports torch or torchvision until images are read: ``sslgrid plan`` checks the files
(``find_files``) on a login node.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.files import atomic_write
from trainers.folders import DataError

if TYPE_CHECKING:
    import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts them
# the idx files as torchvision's MNIST reads them (``<raw>/<name>``, no .gz); t10k is the test split
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NATIVE_SIZE = 28  # pixels, the side of every stored image
SPLIT_SIZES = {"train": 60_000, "val": 10_000}


def source_root(root: str | Path | None) -> Path:
    """The folder the files are read from: ``dataset.root``, or Debian's when it is unset."""
    return DEFAULT_ROOT if root is None else Path(root).expanduser()


def find_files(root: str | Path | None) -> dict[str, Path]:
    """Each of the four ``FILES`` → its path under ``source_root(root)``: ``<name>`` or ``<name>.gz``
    in that folder, or in its ``FashionMNIST/raw/`` (where torchvision downloads them). Reads only
    the directory. Raises DataError naming the folder, the missing files and the two fixes."""
    folder = source_root(root)
    found: dict[str, Path] = {}
    for name in FILES:
        for where in (folder, folder / "FashionMNIST" / "raw"):
            hit = next((where / f for f in (name, name + ".gz") if (where / f).is_file()), None)
            if hit is not None:
                found[name] = hit
                break
    missing = [name for name in FILES if name not in found]
    if missing:
        what = "no such folder" if not folder.is_dir() else f"missing {', '.join(missing)} (.gz or not)"
        raise DataError(f"{folder}: Fashion-MNIST is not there ({what}). Install it with "
                        f"`apt-get install dataset-fashion-mnist` (Debian; files under {DEFAULT_ROOT}), or set "
                        f"dataset.root to a folder holding {', '.join(FILES)} (.gz or not).")
    return found


def unpacked_root(files: dict[str, Path], cache: Path) -> Path:
    """A torchvision root holding ``FashionMNIST/raw/<name>`` for each of ``files`` (``find_files``),
    unzipped once into ``cache``/data and reused after. The folder's name hashes each source file's
    path, size and modification time, so replaced files are unzipped again; it is written to a
    temporary folder and renamed into place, so a crash or a concurrent stage never leaves half of
    it. Raises DataError naming a file that is not valid gzip, or a cache that cannot be written."""
    stats = {name: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for name, p in sorted(files.items())}
    digest = hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:10]
    root = Path(cache) / "data" / f"fashion-mnist-{digest}"
    if (root / "DONE").exists():
        return root
    try:
        with atomic_write(root, folder=True) as tmp:  # another stage may publish the identical folder first
            raw = tmp / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for name, src in files.items():
                try:
                    with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, \
                            open(raw / name, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                except (gzip.BadGzipFile, EOFError) as err:
                    raise DataError(f"{src}: not a whole gzip file ({err}). Reinstall dataset-fashion-mnist or "
                                    f"replace the file.") from err
            (tmp / "DONE").write_text(json.dumps(stats))
    except PermissionError as err:
        raise DataError(f"{root.parent}: the sslgrid cache cannot be written ({err}), and Fashion-MNIST is unzipped "
                        f"there once. Set SSLGRID_CACHE to a writable folder.") from err
    return root


def load(root: str | Path | None, train: bool, image_size: int, cache: Path,
         limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The train split (60,000 images) or, with ``train`` false, the official test split (10,000),
    the first ``limit`` of it when set: images N×3×S×S uint8 (S = ``image_size`` pixels; the grey
    28×28 originals resized by torchvision's ``resize``, bilinear with antialias, on the uint8
    tensor, then repeated to 3 channels), labels N int64 in 0..9, and the 10 class names in
    torchvision's spelling ("T-shirt/top", …, "Ankle boot"). Raises DataError (``find_files``,
    ``unpacked_root``) when the files are missing or unreadable."""
    import torch
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    tv_root = unpacked_root(find_files(root), cache)
    try:
        ds = torchvision.datasets.FashionMNIST(str(tv_root), train=train, download=False)
    except (RuntimeError, AssertionError, ValueError) as err:  # torchvision checks each idx file's header
        raise DataError(f"{source_root(root)}: the Fashion-MNIST files cannot be read ({err}). Reinstall "
                        f"dataset-fashion-mnist or replace them.") from err
    grey, labels = ds.data, ds.targets  # N×28×28 uint8, N int64
    if limit is not None:
        grey, labels = grey[:limit], labels[:limit]
    grey = grey.unsqueeze(1)  # N×1×28×28
    if image_size != NATIVE_SIZE:
        grey = TF.resize(grey, [image_size, image_size], interpolation=TF.InterpolationMode.BILINEAR,
                         antialias=True)
    # backbones and augmentations take 3 channels (on grey pixels, hue and saturation jitter change nothing)
    return grey.expand(-1, 3, -1, -1).contiguous(), labels.to(torch.int64), tuple(ds.classes)


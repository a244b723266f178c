"""JPEG decoding on the device (``dataset.decode: cuda``): DataLoader workers only read each file's
bytes, and the training process decodes a whole batch in one call of torchvision's
``decode_jpeg(list_of_tensors, device=...)`` (nvJPEG on CUDA, batched), then cuts every view's
RandomResizedCrop from the decoded **original** and resizes it there.

The crops are the same keyed boxes as the worker path's (trainers/augment.py ``crop_boxes`` on
``uniforms(seed, epoch, index, view)``, drawn on the original's size, as torchvision draws them),
resized by torchvision's ``transforms.v2.functional.resized_crop`` (bilinear, antialiased: what
RandomResizedCrop does to a tensor). Two differences from the worker path, which uses PIL: the
resampling is torch's implementation of the same antialiased bilinear filter (on 80×60 originals
cropped to 32 px, every value within 1 of PIL's: tests/unit/test_gpu_paths.py), and the JPEG is
always decoded at full size, where PIL decodes at a reduced DCT scale when every box allows it
(those crops differ more). A stage that sets ``decode: cuda`` therefore has its own identity.

The device is a parameter (``decode_crops(..., device)``): on a CPU it runs the same code with
torchvision's CPU decoder, which is how the tests run it. Files that are not JPEGs (PNG, 16-bit
TIFF...) are decoded by PIL in the workers, as the worker path decodes them, and only cropped here.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.augment import CROP_TRIES, AugmentParams, crop_boxes
from trainers.data import DataError, to_rgb
from trainers.keyed import uniforms

JPEG_MAGIC = b"\xff\xd8\xff"
_CROP_COLUMNS = 2 * CROP_TRIES + 2


class FileBytes(torch.utils.data.Dataset):
    """Item (epoch, i): file i as a 1-D uint8 tensor of its bytes when it is a JPEG, else decoded by
    PIL (trainers/data.py ``to_rgb``) to a 3×H×W uint8 tensor; with its label, index and epoch."""

    def __init__(self, files: Sequence, labels: torch.Tensor) -> None:
        self.files, self.labels = list(files), labels
        self.decodes = 0  # files read by this process (a worker's own copy)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, bool, int, int, int]:
        epoch, i = key
        path = self.files[i]
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err}). Remove or replace this file.") from err
        self.decodes += 1
        if data[:3] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, int(self.labels[i]), i, epoch
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(to_rgb(im, path))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot be read as an image ({err}). Remove or replace this file.") from err
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), False, int(self.labels[i]), i, epoch


def collate_bytes(items: list[tuple]) -> tuple[list[torch.Tensor], list[bool], torch.Tensor, torch.Tensor]:
    """FileBytes items → (payloads, which are JPEG bytes, labels b, indices b)."""
    return ([it[0] for it in items], [it[1] for it in items], torch.tensor([it[2] for it in items]),
            torch.tensor([it[3] for it in items]))


def decode_originals(payloads: list[torch.Tensor], is_jpeg: list[bool], device: torch.device,
                     files: Sequence | None = None, idx: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each image as a 3×H×W uint8 tensor on ``device``: the JPEGs decoded in one batched call of
    ``torchvision.io.decode_jpeg`` there (RGB), the others (already decoded by PIL) copied there.
    Raises DataError naming the file when a JPEG cannot be decoded (``files``/``idx`` name it)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [k for k, j in enumerate(is_jpeg) if j]
    if jpegs:
        try:
            decoded = decode_jpeg([payloads[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(payloads[k], device, _name(files, idx, k)) for k in jpegs]
        for k, img in zip(jpegs, decoded):
            out[k] = img
    for k, j in enumerate(is_jpeg):
        if not j:
            out[k] = payloads[k].to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def _name(files: Sequence | None, idx: torch.Tensor | None, k: int) -> str:
    return str(files[int(idx[k])]) if files is not None and idx is not None else f"image {k} of the batch"


def _decode_one(data: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    """One JPEG that the batched call refused (e.g. CMYK, which nvJPEG may not read): decoded on
    the CPU, by torchvision, else by PIL, then moved to ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        img = decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                img = torch.from_numpy(np.asarray(to_rgb(im, name)).copy()).permute(2, 0, 1)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{name}: cannot be decoded as a JPEG ({err}). Remove or replace this file.") from err
    return img.to(device, non_blocking=True)


def view_boxes(seed: int, epoch: int, idx: np.ndarray, view: int, p: AugmentParams, heights: np.ndarray,
               widths: np.ndarray) -> np.ndarray:
    """Every sample's RandomResizedCrop box for ``view``, drawn on its original's size in pixels:
    N×4 (x1, y1, x2, y2), whole pixels. The same keyed draws as the worker path's
    (trainers/loader.py ``CropDataset``)."""
    u = uniforms(seed, epoch, idx, view, _CROP_COLUMNS)
    return crop_boxes(u, heights, widths, p.crop_scale, p.crop_ratio).numpy()


def decode_crops(payloads: list[torch.Tensor], is_jpeg: list[bool], idx: torch.Tensor, epoch: int, seed: int,
                 views: Sequence[AugmentParams], size: int, device: torch.device,
                 files: Sequence | None = None) -> list[torch.Tensor]:
    """One uint8 b×3×size×size batch per view, on ``device``: each image decoded once (there), and
    each view's box cut from the original and resized to size×size (torchvision's resized_crop,
    bilinear, antialiased), as torchvision's RandomResizedCrop does."""
    import torchvision.transforms.v2.functional as TF

    originals = decode_originals(payloads, is_jpeg, device, files, idx)
    heights = np.array([o.shape[1] for o in originals])
    widths = np.array([o.shape[2] for o in originals])
    idx_np = idx.numpy()
    out = []
    for v, p in enumerate(views):
        boxes = view_boxes(seed, epoch, idx_np, v, p, heights, widths).astype(np.int64).tolist()
        crops = [TF.resized_crop(o, top=y1, left=x1, height=y2 - y1, width=x2 - x1, size=[size, size], antialias=True)
                 for o, (x1, y1, x2, y2) in zip(originals, boxes)]
        out.append(torch.stack(crops) if crops else torch.empty((0, 3, size, size), dtype=torch.uint8, device=device))
    return out

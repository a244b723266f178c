"""Frozen backbone features: ``extract`` runs a backbone over un-augmented images, and a cache keeps
a checkpoint's features for the stages that read them.

The cached linear probe and the kNN stage both need the backbone's un-augmented features of the
train and val splits, and the online kNN monitor computes exactly those at the last epoch. Each
stage would otherwise run the backbone over both splits again; VISSL likewise extracts features
once and runs its low-shot and kNN benchmarks on them.

The cache lives beside the checkpoint (``<checkpoint dir>/features/``). A file's name hashes the
checkpoint's size and modification time, the dataset section, the split and the view, so a
checkpoint rewritten by a forced rerun never serves stale features. Files are written by
write-then-rename, so two stages that extract at the same time both end with a whole file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers import distributed as D
from trainers.augment import AugmentParams, eval_view
from trainers.data import LazyImages, _load_image
from trainers.loader import Shard, default_workers
from trainers.loop import autocast

if TYPE_CHECKING:
    from pipeline.spec import DatasetSpec


class _EvalFiles(torch.utils.data.Dataset):
    """File i in the evaluation view (trainers/data.py ``_load_image``), for DataLoader workers."""

    def __init__(self, images: LazyImages, start: int, stop: int):
        self.files, self.size, self.native, self.start, self.stop = (images.files, images.image_size, images.native,
                                                                     start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(_load_image(self.files[self.start + i], self.size, self.native)).permute(2, 0, 1)


def _shard_batches(images: torch.Tensor | LazyImages, start: int, stop: int, batch: int, dev: torch.device,
                   workers: int | None) -> Iterator[torch.Tensor]:
    if isinstance(images, LazyImages):  # decoded by DataLoader workers, ahead of the backbone
        workers = default_workers() if workers is None else workers
        loader = torch.utils.data.DataLoader(_EvalFiles(images, start, stop), batch_size=batch, num_workers=workers,
                                             pin_memory=dev.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        yield from loader
    else:
        for i in range(start, stop, batch):
            yield images[i:min(i + batch, stop)]


@torch.no_grad()
def extract(backbone: nn.Module, images: torch.Tensor | LazyImages, aug: AugmentParams, batch: int = 512,
            precision: str = "fp32", workers: int | None = None) -> torch.Tensor:
    """Backbone features h (N×C float32, on the CPU) of uint8 images (N×3×S×S tensor, or a
    LazyImages decoded in the evaluation view by DataLoader workers), un-augmented, batch by batch on
    the backbone's device, under ``precision``'s autocast. Under torch.distributed every rank
    extracts a contiguous share and all get the whole result. The caller sets train/eval mode.
    Raises DataError (trainers/data.py) naming an unreadable file."""
    dev = next(backbone.parameters()).device
    n = len(images)
    shard = Shard.of(n)
    out = []
    for x in _shard_batches(images, shard.start, shard.stop, batch, dev, workers):
        x = eval_view(x.to(dev, non_blocking=True), aug)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision):
            out.append(backbone(x).float())  # b×C
    feats = torch.cat(out) if out else torch.zeros((0, _feat_dim(backbone)), device=dev)
    return D.gather_shards(feats, n).cpu()


def _feat_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "feat_dim"))


# dataset fields added after feature caches existed, left out of the hash at the value that reproduces
# what the older caches hold (as pipeline/spec.py's ``legacy`` does for identities), so no cache is lost
ADDED_SINCE = {"decode": "cpu"}


def cache_path(ckpt: str | Path, ds: DatasetSpec, split: str, aug: AugmentParams, precision: str = "fp32") -> Path:
    """``<ckpt dir>/features/<split>-<16 hex>.pt``. The hash covers the checkpoint file's size and
    mtime, every field of ``ds`` (as the JSON the stages hashed when they received the section as a
    dict, so existing caches stay valid), the split, the view and a precision other than fp32.
    Raises FileNotFoundError when ``ckpt`` does not exist."""
    ckpt = Path(ckpt)
    st = ckpt.stat()
    dataset = {k: v for k, v in dataclasses.asdict(ds).items() if ADDED_SINCE.get(k, object()) != v}
    fields = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dataset": dataset, "split": split,
              "view": dataclasses.asdict(aug)}
    if precision != "fp32":  # fp32 files keep the names they had before precision existed
        fields["precision"] = precision
    key = json.dumps(fields, sort_keys=True, default=str)  # tuples become lists, as they were in the dict
    return ckpt.parent / "features" / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def store(ckpt: str | Path, ds: DatasetSpec, split: str, aug: AugmentParams, feats: torch.Tensor,
          precision: str = "fp32") -> None:
    """Write ``feats`` (N×C) to ``cache_path``, from rank 0 only (every rank holds the gathered features)."""
    if D.world().is_main:
        checkpoint.atomic_save(feats.cpu(), cache_path(ckpt, ds, split, aug, precision))


def frozen_features(backbone: nn.Module, images: torch.Tensor | LazyImages, ckpt: str | Path, ds: DatasetSpec,
                    split: str, aug: AugmentParams, precision: str = "fp32") -> torch.Tensor:
    """``extract(backbone, images, aug)`` (N×C float32, CPU) for the backbone loaded from ``ckpt``,
    read from the cache when a stage already computed it; a cached file of another length, or one
    that cannot be read, is recomputed and replaced. The caller sets eval mode."""
    path = cache_path(ckpt, ds, split, aug, precision)
    if path.exists():
        try:
            feats = checkpoint.load(path)
            if feats.shape[0] == len(images):
                return feats
        except Exception:  # a partial or foreign file: recompute and replace it
            pass
    feats = extract(backbone, images, aug, precision=precision)
    store(ckpt, ds, split, aug, feats, precision)
    return feats

"""Frozen features of a checkpoint, extracted once and shared by the stages that read them.

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
from pathlib import Path

import torch
import torch.nn as nn

from trainers import checkpoint
from trainers.augment import AugmentParams
from trainers.knn import extract


def cache_path(ckpt: str | Path, dataset: dict, split: str, aug: AugmentParams, precision: str = "fp32") -> Path:
    ckpt = Path(ckpt)
    st = ckpt.stat()
    fields = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dataset": dataset, "split": split,
              "view": dataclasses.asdict(aug)}
    if precision != "fp32":  # fp32 files keep the names they had before precision existed
        fields["precision"] = precision
    key = json.dumps(fields, sort_keys=True, default=str)
    return ckpt.parent / "features" / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def store(ckpt: str | Path, dataset: dict, split: str, aug: AugmentParams, feats: torch.Tensor,
          precision: str = "fp32") -> None:
    from trainers import distributed as D

    if D.world().is_main:  # every rank has the gathered features; one writes them
        checkpoint.atomic_save(feats.cpu(), cache_path(ckpt, dataset, split, aug, precision))


def frozen_features(backbone: nn.Module, images, ckpt: str | Path, dataset: dict, split: str,
                    aug: AugmentParams, precision: str = "fp32") -> torch.Tensor:
    """``extract(backbone, images, aug)`` for the backbone loaded from ``ckpt``, read from the cache
    when a stage already computed it. The caller sets eval mode."""
    path = cache_path(ckpt, dataset, split, aug, precision)
    if path.exists():
        try:
            feats = checkpoint.load(path)
            if feats.shape[0] == len(images):
                return feats
        except Exception:  # a partial or foreign file: recompute and replace it
            pass
    feats = extract(backbone, images, aug, precision=precision)
    store(ckpt, dataset, split, aug, feats, precision)
    return feats

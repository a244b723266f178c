"""The frozen-feature cache shared by the probe, the kNN stage and the online monitor."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from evaluators.knn import knn
from evaluators.linear_probe import linear_probe
from tests.conftest import tiny_config
from trainers.augment import AugmentParams
from trainers.data import load_split
from trainers.features import cache_path, extract, frozen_features
from trainers.pretrain import load_backbone, pretrain
from trainers.sink import ListSink


def test_monitor_leaves_the_final_checkpoints_features_and_stages_reuse_them(tmp_path):
    cfg = tiny_config(epochs=2, knn_every=1)
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    backbone = load_backbone(cfg, pre.checkpoint)
    aug = AugmentParams()
    for split in ("train", "val"):
        path = cache_path(pre.checkpoint, cfg.dataset, split, aug)
        assert path.exists(), f"the monitor's last-epoch {split} features were not cached"
        fresh = extract(backbone, load_split(cfg.dataset, split).images, aug)
        torch.testing.assert_close(torch.load(path), fresh, rtol=1e-4, atol=1e-5)

    cached = linear_probe(cfg, pre, tmp_path / "probe-a", ListSink())
    for f in (tmp_path / "pre" / "checkpoints" / "features").iterdir():
        f.unlink()
    recomputed = linear_probe(cfg, pre, tmp_path / "probe-b", ListSink())
    assert abs(cached.metrics["top1"] - recomputed.metrics["top1"]) < 1e-6
    assert knn(cfg, pre, tmp_path / "knn", ListSink()).metrics["top1"] >= 0


def test_cache_is_read_back_and_keyed_by_the_checkpoint_file(tmp_path):
    cfg = tiny_config(method="none")
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    backbone, images, aug = load_backbone(cfg, pre.checkpoint), load_split(cfg.dataset, "val").images, AugmentParams()
    first = frozen_features(backbone, images, pre.checkpoint, cfg.dataset, "val", aug)

    class Refuses(torch.nn.Module):  # a second extraction would call this
        def forward(self, x):
            raise AssertionError("features were extracted again instead of read from the cache")

    refuses = Refuses()
    refuses.p = torch.nn.Parameter(torch.zeros(1))
    assert torch.equal(frozen_features(refuses, images, pre.checkpoint, cfg.dataset, "val", aug), first)
    before = cache_path(pre.checkpoint, cfg.dataset, "val", aug)
    st = os.stat(pre.checkpoint)
    os.utime(pre.checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten checkpoint
    assert cache_path(pre.checkpoint, cfg.dataset, "val", aug) != before
    other = replace(cfg.dataset, num_val=24)
    assert cache_path(pre.checkpoint, other, "val", aug) != before


def test_cache_names_are_those_the_dict_sections_gave(tmp_path):
    """Pinned on the code that hashed the dataset section as pipeline passed it (a dict, to_dict of
    the spec): a cache written before the stages received typed specs is still found."""
    from pipeline.spec import DatasetSpec

    ckpt = tmp_path / "final.pt"
    ckpt.write_bytes(b"\0" * 1234)
    os.utime(ckpt, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    synthetic = DatasetSpec(num_train=96, num_val=48)
    folder = DatasetSpec(name="imagefolder", root="/data/imagenet", image_size=224, in_memory=False, workers=8,
                         max_val=500)
    assert cache_path(ckpt, synthetic, "train", AugmentParams()).name == "train-e91382ba0a2f86d3.pt"
    assert cache_path(ckpt, folder, "val", AugmentParams(), "bf16").name == "val-b8eb139c823b565b.pt"

"""The frozen-feature cache shared by the probe, the kNN stage and the online monitor."""
from __future__ import annotations

import os

import torch

from evaluators.knn import knn
from evaluators.linear_probe import linear_probe
from tests.conftest import tiny_spec
from trainers.augment import AugmentParams
from trainers.data import load_split
from trainers.features import cache_path, frozen_features
from trainers.knn import extract
from trainers.pretrain import load_backbone, pretrain
from trainers.sink import ListSink


def test_monitor_leaves_the_final_checkpoints_features_and_stages_reuse_them(tmp_path):
    spec = tiny_spec(epochs=2, knn_every=1)
    pre = pretrain(spec, tmp_path / "pre", ListSink())
    backbone = load_backbone(spec, pre["checkpoint"])
    aug = AugmentParams()
    for split in ("train", "val"):
        path = cache_path(pre["checkpoint"], spec["dataset"], split, aug)
        assert path.exists(), f"the monitor's last-epoch {split} features were not cached"
        fresh = extract(backbone, load_split(spec["dataset"], split).images, aug)
        torch.testing.assert_close(torch.load(path), fresh, rtol=1e-4, atol=1e-5)

    cached = linear_probe(spec, pre, tmp_path / "probe-a", ListSink())
    for f in (tmp_path / "pre" / "checkpoints" / "features").iterdir():
        f.unlink()
    recomputed = linear_probe(spec, pre, tmp_path / "probe-b", ListSink())
    assert abs(cached["top1"] - recomputed["top1"]) < 1e-6
    assert knn(spec, pre, tmp_path / "knn", ListSink())["top1"] >= 0


def test_cache_is_read_back_and_keyed_by_the_checkpoint_file(tmp_path):
    spec = tiny_spec(method="none")
    pre = pretrain(spec, tmp_path / "pre", ListSink())
    backbone, images, aug = load_backbone(spec, pre["checkpoint"]), load_split(spec["dataset"], "val").images, AugmentParams()
    first = frozen_features(backbone, images, pre["checkpoint"], spec["dataset"], "val", aug)

    class Refuses(torch.nn.Module):  # a second extraction would call this
        def forward(self, x):
            raise AssertionError("features were extracted again instead of read from the cache")

    refuses = Refuses()
    refuses.p = torch.nn.Parameter(torch.zeros(1))
    assert torch.equal(frozen_features(refuses, images, pre["checkpoint"], spec["dataset"], "val", aug), first)
    before = cache_path(pre["checkpoint"], spec["dataset"], "val", aug)
    st = os.stat(pre["checkpoint"])
    os.utime(pre["checkpoint"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten checkpoint
    assert cache_path(pre["checkpoint"], spec["dataset"], "val", aug) != before
    other = dict(spec["dataset"], num_val=24)
    assert cache_path(pre["checkpoint"], other, "val", aug) != before

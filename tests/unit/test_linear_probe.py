"""The probe must leave every backbone tensor as it found it (moco main_lincls sanity_check)."""
from __future__ import annotations

import pytest
import torch

from evaluators.linear_probe import BackboneChanged, linear_probe, sanity_check
from trainers import checkpoint
from trainers.pretrain import pretrain
from trainers.sink import ListSink
from tests.conftest import tiny_spec


@pytest.mark.parametrize("mode", ["cached", "moco"])
def test_probe_leaves_backbone_unchanged(tmp_path, mode):
    spec = tiny_spec(method="none")
    spec["linear_probe"]["mode"] = mode
    up = pretrain(spec, tmp_path / "pre", ListSink())
    before = checkpoint.load(up["checkpoint"])["backbone"]
    sink = ListSink()
    result = linear_probe(spec, up, tmp_path / "probe", sink)
    after = checkpoint.load(up["checkpoint"])["backbone"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result["protocol"] == mode and 0 <= result["top1"] <= 100
    assert len(sink.series("val_top1")) == 3 and sink.series("top1") == [result["top1"]]


def test_sanity_check_catches_a_moved_bn_statistic():
    from trainers.backbones import TinyResNet

    net = TinyResNet(widths=(4, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(4, 3, 8, 8))  # BN in train mode moves running stats without any gradient
    with pytest.raises(BackboneChanged, match="running_mean"):
        sanity_check(net, before)

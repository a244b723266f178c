"""The probe must leave every backbone tensor as it found it (moco main_lincls sanity_check)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evaluators.linear_probe import BackboneChanged, linear_probe, sanity_check
from trainers import checkpoint
from trainers.pretrain import pretrain
from trainers.sink import ListSink
from tests.conftest import tiny_config


@pytest.mark.parametrize("mode", ["cached", "moco"])
def test_probe_leaves_backbone_unchanged(tmp_path, mode):
    cfg = tiny_config(method="none")
    cfg = replace(cfg, linear_probe=replace(cfg.linear_probe, mode=mode))
    up = pretrain(cfg, tmp_path / "pre", ListSink())
    before = checkpoint.load(up.checkpoint)["backbone"]
    sink = ListSink()
    result = linear_probe(cfg, up, tmp_path / "probe", sink)
    after = checkpoint.load(up.checkpoint)["backbone"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.info["protocol"] == mode and 0 <= result.metrics["top1"] <= 100
    assert len(sink.series("val_top1")) == 3 and sink.series("top1") == [result.metrics["top1"]]


def test_sanity_check_catches_a_moved_bn_statistic():
    from trainers.backbones import TinyResNet

    net = TinyResNet(widths=(4, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(4, 3, 8, 8))  # BN in train mode moves running stats without any gradient
    with pytest.raises(BackboneChanged, match="running_mean"):
        sanity_check(net, before)


def _probe_counting_rows(cfg, tmp_path, monkeypatch) -> list[torch.Tensor]:
    """Run the probe on ``cfg`` (a StageConfig); return the dataset indices of every step's rows, in order."""
    import evaluators.linear_probe as lp

    up = pretrain(cfg, tmp_path / "pre", ListSink())
    seen: list[torch.Tensor] = []
    real_fit = lp.fit

    def counting_fit(model, step_fn, *args, **kwargs):
        def step(net, inputs, y, idx, g, at):
            seen.append(idx.cpu())
            return step_fn(net, inputs, y, idx, g, at)
        return real_fit(model, step, *args, **kwargs)

    monkeypatch.setattr(lp, "fit", counting_fit)
    lp.linear_probe(cfg, up, tmp_path / "probe", ListSink())
    return seen


@pytest.mark.parametrize("mode", ["cached", "moco"])
def test_probe_trains_on_every_image_each_epoch(tmp_path, monkeypatch, mode):
    """Issue 11: 300 images at batch 256 used 256 per epoch; main_lincls keeps the last partial batch."""
    cfg = tiny_config(method="none")
    cfg = replace(cfg, dataset=replace(cfg.dataset, num_train=300),
                  linear_probe=replace(cfg.linear_probe, mode=mode, epochs=2, batch_size=256))
    seen = _probe_counting_rows(cfg, tmp_path, monkeypatch)
    assert [len(s) for s in seen] == [256, 44, 256, 44]
    for epoch in (seen[:2], seen[2:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(300))


def test_probe_with_legacy_drop_last_keeps_old_behaviour(tmp_path, monkeypatch):
    """``drop_last: true`` (the legacy value, which keeps old stages' identities) still drops the rest."""
    cfg = tiny_config(method="none")
    cfg = replace(cfg, dataset=replace(cfg.dataset, num_train=300),
                  linear_probe=replace(cfg.linear_probe, epochs=1, batch_size=256, drop_last=True))
    assert [len(s) for s in _probe_counting_rows(cfg, tmp_path, monkeypatch)] == [256]
    from pipeline.spec import to_dict

    assert "drop_last" not in to_dict(cfg.linear_probe, identity_only=True)  # an old stage's key
    new = tiny_config().linear_probe  # the default, false
    assert to_dict(new, identity_only=True)["drop_last"] is False  # new stages: a new identity

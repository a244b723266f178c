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


# ---------------------------------------------------------------------------------------------
# linear_probe.repeats (issue 20): N probes on the same cached features, averaged in one stage


def _probe(cfg, up, where, **fields):
    from evaluators.linear_probe import linear_probe as run

    cfg = replace(cfg, linear_probe=replace(cfg.linear_probe, **fields))
    sink = ListSink()
    return run(cfg, up, where, sink), sink


def test_repeats_top1_is_the_mean_of_separately_seeded_single_probes(tmp_path):
    import statistics

    from evaluators.linear_probe import probe_seeds

    cfg = tiny_config(method="none")
    up = pretrain(cfg, tmp_path / "pre", ListSink())
    seeds = probe_seeds(7, 3)
    fast = {"lr": 3.0, "batch_size": 8}  # 36 steps: enough for the seeds to move the random features' top-1
    singles = [_probe(cfg, up, tmp_path / f"one{s}", seed=s, **fast)[0] for s in seeds]
    tops = [r.metrics["top1"] for r in singles]
    assert len(set(tops)) > 1  # the probes differ, so a stage that ignored repeats could not pass
    result, sink = _probe(cfg, up, tmp_path / "three", seed=7, repeats=3, **fast)
    m = result.metrics
    assert m["top1"] == pytest.approx(statistics.fmean(tops), abs=1e-9)
    assert m["best_top1"] == pytest.approx(statistics.fmean(r.metrics["best_top1"] for r in singles), abs=1e-9)
    assert [m[f"top1_probe{i}"] for i in range(3)] == tops
    assert m["top1_probe_sd"] == pytest.approx(statistics.stdev(tops), abs=1e-9)
    assert m["repeats"] == 3 and m["val_images"] == 48 and result.info["probe_seeds"] == seeds
    # each probe's epochs are its own series; the stage's headline is logged once, at the end
    assert [len(sink.series(f"val_top1_probe{i}")) for i in range(3)] == [3, 3, 3] and not sink.series("val_top1")
    assert sink.series("top1") == [m["top1"]] and sink.series("top1_probe_sd") == [m["top1_probe_sd"]]
    assert sink.progress_calls[-1] == (9, 9)


def test_one_probe_logs_as_before_plus_val_images(tmp_path):
    cfg = tiny_config(method="none")
    up = pretrain(cfg, tmp_path / "pre", ListSink())
    result, sink = _probe(cfg, up, tmp_path / "one")
    assert set(result.metrics) == {"top1", "best_top1", "val_images", "epochs"} and "probe_seeds" not in result.info
    assert result.metrics["val_images"] == 48 and sink.series("val_images") == [48.0]
    assert len(sink.series("val_top1")) == 3


def test_probe_seeds_start_at_the_stage_seed_and_do_not_reuse_the_next_replicates():
    from evaluators.linear_probe import probe_seeds

    assert probe_seeds(4, 1) == [4]
    seeds = probe_seeds(0, 5)
    assert seeds[0] == 0 and len(set(seeds)) == 5 and all(0 <= s <= 2**31 - 1 for s in seeds)
    assert not set(seeds[1:]) & set(range(10))  # not seed + i: replicate 1's probe seed is 1
    assert probe_seeds(0, 3) == seeds[:3]  # a probe's seed does not depend on how many there are


def test_a_killed_repeat_stage_resumes_at_its_unfinished_probe(tmp_path, monkeypatch):
    import evaluators.linear_probe as lp

    cfg = tiny_config(method="none")
    up = pretrain(cfg, tmp_path / "pre", ListSink())
    first, _ = _probe(cfg, up, tmp_path / "stage", repeats=3)
    for name in ("last-probe2.pt", "last-probe2.prev.pt"):  # killed before probe 2 saved an epoch
        (tmp_path / "stage" / "checkpoints" / name).unlink()
    steps = []
    real_fit = lp.fit

    def counting_fit(model, step_fn, *args, **kwargs):
        def step(net, inputs, y, idx, g, at):
            steps.append(len(idx))
            return step_fn(net, inputs, y, idx, g, at)
        return real_fit(model, step, *args, **kwargs)

    monkeypatch.setattr(lp, "fit", counting_fit)
    again, _ = _probe(cfg, up, tmp_path / "stage", repeats=3)
    assert sum(steps) == 3 * 96  # probe 2's 3 epochs of the 96 training images; probes 0 and 1 were done
    assert again.metrics == first.metrics


def test_repeats_keeps_every_probe_identity_at_1_and_changes_it_above(tmp_path):
    import json
    from pathlib import Path

    from pipeline.grid import load_grid
    from pipeline.plan import build_plan

    grid = Path(__file__).resolve().parents[2] / "grids" / "quickstart.yaml"
    pinned = json.loads((Path(__file__).parent / "identities.json").read_text())["quickstart"]
    keys = {r: sorted(f"{s.kind}/{s.key}" for s in build_plan(load_grid(grid, [f"linear_probe.repeats={r}"])).ordered())
            for r in (1, 3)}
    assert keys[1] == pinned  # the identity of every existing probe stage
    probes = {r: {k for k in keys[r] if k.startswith("linear_probe/")} for r in (1, 3)}
    assert len(probes[3]) == len(probes[1]) == 3 and not probes[1] & probes[3]
    assert set(keys[3]) - probes[3] == set(keys[1]) - probes[1]  # nothing else moves


def test_repeats_with_mode_moco_is_refused_naming_the_field_and_the_fix(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.grid import GridError, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\ndefaults:\n  pretrain: {method: none}\n  linear_probe: {mode: moco, repeats: 3}\n")
    with pytest.raises(GridError) as err:
        load_grid(grid)
    assert "linear_probe.repeats = 3" in str(err.value) and "set linear_probe.mode: cached" in str(err.value)
    assert main(["plan", str(grid)]) == 2
    assert main(["plan", str(grid), "-o", "linear_probe.mode=cached"]) == 0

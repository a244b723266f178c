"""Deep Image Prior inversion: the feature loss falls, z is inverted only with a head, and the image
grid has one row per image and a column per target."""
from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from tests.conftest import tiny_config
from trainers.pretrain import pretrain
from trainers.sink import ListSink


def test_unet_keeps_the_size_and_range():
    from evaluators.inversion import UNet

    out = UNet()(torch.rand(2, 32, 32, 32) * 0.1)
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_inversion_loss_falls_and_grid_has_a_column_per_target(tmp_path):
    from evaluators.inversion import inversion

    cfg = tiny_config(epochs=1)  # MoCo v2 with the MLP head: h and z
    pre = pretrain(cfg, tmp_path / "pre", ListSink())
    small = {"images": 2, "iterations": 60, "lr": 1e-3, "seed": 0, "dpi": 50}
    result = inversion(replace(cfg, inversion=replace(cfg.inversion, **small)), pre, tmp_path / "inv", ListSink())
    assert result.info["targets"] == ["h", "z"]
    for t in ("h", "z"):
        assert result.metrics[f"inv_loss_{t}_last"] < 0.5 * result.metrics[f"inv_loss_{t}_first"], result
    with Image.open(tmp_path / "inv" / "inversion.png") as im:
        assert im.size == (int(1.5 * 3 * 50), int(1.5 * 2 * 50))  # 3 columns, 2 rows of 1.5 inches
    saved = torch.load(tmp_path / "inv" / "inversion.pt")
    assert saved["h"].shape == saved["z"].shape == saved["originals"].shape == (2, 3, 32, 32)

    cfg = tiny_config(epochs=1, head={"kind": "none"})
    pre = pretrain(cfg, tmp_path / "pre-nohead", ListSink())
    cfg = replace(cfg, inversion=replace(cfg.inversion, **small))
    assert inversion(cfg, pre, tmp_path / "inv2", ListSink()).info["targets"] == ["h"]

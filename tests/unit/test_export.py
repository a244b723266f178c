"""export-detectron2: detectron2's names for a torchvision ResNet, and clear refusals."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import torch

from evaluators.export import detectron2_name
from pipeline.cli import main
from tests.conftest import tiny_config
from trainers.backbones import build_backbone
from trainers import checkpoint


def test_names_follow_detectron2():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert detectron2_name("layer1.0.conv2.weight") == "res2.0.conv2.weight"
    assert detectron2_name("layer4.1.bn3.bias") == "res5.1.conv3.norm.bias"
    assert detectron2_name("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_name("layer2.0.downsample.1.running_var") == "res3.0.shortcut.norm.running_var"


def test_export_writes_every_backbone_tensor(tmp_path, capsys):
    bb = build_backbone(replace(tiny_config().backbone, name="resnet18", bn_splits=1, cifar_stem=False))
    checkpoint.atomic_save({"backbone": bb.state_dict(), "method": "mocov2"}, tmp_path / "final.pt")
    assert main(["export-detectron2", str(tmp_path / "final.pt"), str(tmp_path / "r18.pkl")]) == 0
    model = pickle.load(open(tmp_path / "r18.pkl", "rb"))["model"]
    n = sum(1 for k in bb.state_dict() if not k.endswith("num_batches_tracked"))
    assert len(model) == n
    np.testing.assert_array_equal(model["res5.1.conv2.weight"], bb.net.layer4[1].conv2.weight.detach().numpy())
    assert model["stem.conv1.weight"].shape == (64, 3, 7, 7)


def test_export_refuses_a_backbone_detectron2_lacks(tmp_path, capsys):
    bb = build_backbone(tiny_config().backbone)
    checkpoint.atomic_save({"backbone": bb.state_dict()}, tmp_path / "final.pt")
    assert main(["export-detectron2", str(tmp_path / "final.pt"), str(tmp_path / "x.pkl")]) == 2
    assert "export works for resnet18, resnet50" in capsys.readouterr().out
    assert not (tmp_path / "x.pkl").exists()
    torch.save({"model": {}}, tmp_path / "last.pt")
    assert main(["export-detectron2", str(tmp_path / "last.pt"), str(tmp_path / "x.pkl")]) == 2
    assert "not a pretraining checkpoint" in capsys.readouterr().out

from __future__ import annotations

import pytest
import torch

from pipeline.spec import BackboneSpec
from trainers.backbones import SplitBatchNorm2d, build_backbone


@pytest.mark.parametrize("name,dim", [("tiny_resnet", 256), ("resnet18", 512)])
def test_backbones_give_pooled_features(name, dim):
    net = build_backbone(BackboneSpec(name=name, bn_splits=2, cifar_stem=True))
    assert net.feat_dim == dim
    assert any(isinstance(m, SplitBatchNorm2d) for m in net.modules())
    h = net.train()(torch.randn(4, 3, 32, 32))
    assert h.shape == (4, dim)


def test_split_bn_needs_divisible_batch():
    net = build_backbone(BackboneSpec(name="tiny_resnet", bn_splits=3))
    with pytest.raises(ValueError, match="not divisible by bn_splits=3"):
        net.train()(torch.randn(4, 3, 16, 16))

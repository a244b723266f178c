"""Batched augmentation: crop geometry, colour maths, determinism."""
from __future__ import annotations

import colorsys

import torch
import torchvision.transforms.v2.functional as TF

from trainers.augment import (AugmentParams, _hsv_to_rgb, _rgb_to_hsv, augment, gaussian_blur, sample_crop_boxes)


def test_crop_boxes_inside_image_and_area_in_scale():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(2000, 32, 40, (0.2, 0.5), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 32).all()
    frac = (w * h) / (32 * 40)
    assert frac.min() > 0.17 and frac.max() < 0.53  # rounding to whole pixels moves it a little


def test_hsv_roundtrip_matches_colorsys():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g)
    hsv = _rgb_to_hsv(x)
    for r, gg, b, h, s, v in zip(*(x[:, c].flatten() for c in range(3)), *(hsv[:, c].flatten() for c in range(3))):
        want = colorsys.rgb_to_hsv(float(r), float(gg), float(b))
        assert abs(float(h) - want[0]) < 1e-5 or abs(abs(float(h) - want[0]) - 1) < 1e-5
        assert abs(float(s) - want[1]) < 1e-5 and abs(float(v) - want[2]) < 1e-5
    assert torch.allclose(_hsv_to_rgb(hsv), x, atol=1e-5)


def test_blur_matches_torchvision():
    x = torch.rand(2, 3, 20, 20)
    sigma = torch.tensor([0.7, 1.5])
    ours = gaussian_blur(x, sigma)
    for i in range(2):
        ref = TF.gaussian_blur(x[i:i + 1], kernel_size=[3, 3], sigma=[float(sigma[i])] * 2)
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-5)


def test_augment_is_deterministic_per_generator_and_varies_per_sample():
    imgs = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    p = AugmentParams()
    a = augment(imgs, p, 32, torch.Generator().manual_seed(3))
    b = augment(imgs, p, 32, torch.Generator().manual_seed(3))
    c = augment(imgs, p, 32, torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = augment(imgs[:1].expand(8, -1, -1, -1).contiguous(), p, 32, torch.Generator().manual_seed(0))
    assert not torch.allclose(same[0], same[1])  # independent parameters per sample

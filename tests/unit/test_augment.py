"""Batched augmentation: crop geometry, colour maths, determinism."""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

from trainers.augment import (AugmentParams, augment, eval_view, gaussian_blur, hue_shift, normalize,
                               sample_crop_boxes, solarize)


def test_crop_boxes_inside_image_and_area_in_scale():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(2000, 32, 40, (0.2, 0.5), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 32).all()
    frac = (w * h) / (32 * 40)
    assert frac.min() > 0.17 and frac.max() < 0.53  # rounding to whole pixels moves it a little


def test_hue_shift_matches_torchvision_adjust_hue():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 9, generator=g)
    x[0] = 0.5  # grey: hue undefined, must stay grey
    x[1, :, :3] = x[1, 0:1, :3]
    x[2, 0] = x[2, 1]  # ties between max channels
    shifts = torch.tensor([0.1, -0.1, 0.05, 0.5, -0.5, 0.33])
    ours = hue_shift(x, shifts)
    for i in range(6):
        ref = TF.adjust_hue(x[i], float(shifts[i]))
        assert torch.allclose(ours[i], ref, atol=1e-5), (i, (ours[i] - ref).abs().max())


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


def test_solarize_matches_torchvision():
    x = torch.rand(2, 3, 5, 5)
    x[0, 0, 0, 0] = 0.5  # on the threshold: solarised, as torchvision does
    torch.testing.assert_close(solarize(x), TF.solarize(x, threshold=0.5))


def test_byol_views_are_asymmetric():
    import dataclasses

    from pipeline.spec import build_stage_config
    from trainers.pretrain import augment_params

    problems: list = []
    cfg = build_stage_config({"pretrain": {"method": "byol"}}, problems)  # the preset of trainers/methods/byol.py
    assert not problems
    aug = cfg.pretrain.augment
    first, second = augment_params(aug)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    # a grid that turns blur off turns it off in both views (Table 3's "w/o GaussianBlur")
    assert [v.blur_p for v in augment_params(dataclasses.replace(aug, blur=False))] == [0.0, 0.0]
    # MoCo's views are drawn alike
    mo = augment_params(build_stage_config({}, problems).pretrain.augment)
    assert mo[0] == mo[1] and mo[0].solarize_p == 0.0


def test_second_view_parameters_apply_to_the_second_view_only():
    from pipeline.spec import AugmentSpec
    from trainers.pretrain import augment_params

    base = AugmentSpec(crop_scale=(1.0, 1.0), color_strength=0.0, color_jitter=None, color_p=0.0, grayscale_p=0.0,
                       blur=True, blur_p=0.0, flip=False, solarize_p=0.0, view2_blur_p=None, view2_solarize_p=1.0)
    first, second = augment_params(base)
    imgs = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    plain = eval_view(imgs, first)
    v1 = augment(imgs, first, 32, torch.Generator().manual_seed(0))
    v2 = augment(imgs, second, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v1, plain, atol=1e-5, rtol=0)  # whole-image crop, nothing else
    torch.testing.assert_close(v2, normalize(solarize(imgs.float() / 255), first), atol=1e-5, rtol=0)

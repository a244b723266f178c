"""Keyed random numbers (trainers/keyed.py) and the crop geometry drawn from them."""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from trainers.augment import DRAWS, crop_boxes
from trainers.keyed import uniforms


def test_rows_depend_on_the_key_alone():
    idx = np.arange(1000)
    full = uniforms(3, 7, idx, 1, DRAWS)
    assert full.shape == (1000, DRAWS) and full.dtype == np.float64
    # any subset, in any order, gets exactly its rows: what lets ranks and workers draw independently
    pick = np.array([999, 5, 0, 512, 5])
    np.testing.assert_array_equal(uniforms(3, 7, pick, 1, DRAWS), full[pick])
    # every key field matters
    for other in (uniforms(4, 7, idx, 1, DRAWS), uniforms(3, 8, idx, 1, DRAWS), uniforms(3, 7, idx, 0, DRAWS)):
        assert not np.allclose(other, full)


def test_uniform_and_uncorrelated():
    u = uniforms(0, 0, np.arange(20000), 0, 8)
    assert ((u >= 0) & (u < 1)).all()
    for j in range(8):  # Kolmogorov-Smirnov against U(0, 1), per column
        assert stats.kstest(u[:, j], "uniform").pvalue > 1e-3
    corr = np.corrcoef(u.T)
    assert np.abs(corr - np.eye(8)).max() < 0.03
    # neighbouring indices are not correlated either
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03


def test_crop_boxes_are_drawn_on_the_original_and_cover_it():
    """Over many draws on a 400×300 original, the boxes reach every part of the image (the old path
    centre-cropped to a square first, so 25% of a 4:3 picture could never appear)."""
    n = 20000
    u = torch.from_numpy(uniforms(0, 0, np.arange(n), 0, DRAWS)[:, :22])
    boxes = crop_boxes(u, 300, 400, (0.2, 1.0), (3 / 4, 4 / 3))
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 400).all() and (boxes[:, 3] <= 300).all()
    covered = torch.zeros(300, 400, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.long().tolist():
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    # the leftmost and rightmost 50 columns, outside any centred 300×300 square, are reached often
    assert (boxes[:, 0] < 50).float().mean() > 0.3 and (boxes[:, 2] > 350).float().mean() > 0.3


def test_crop_area_is_the_drawn_fraction_of_the_original():
    """With a fixed scale s (area fraction) every box covers s of the original's area, up to the
    rounding of its sides to whole pixels."""
    n = 2000
    u = torch.from_numpy(uniforms(1, 0, np.arange(n), 0, DRAWS)[:, :22])
    for s in (0.05, 0.2, 0.5):
        boxes = crop_boxes(u, 300, 400, (s, s), (3 / 4, 4 / 3))
        frac = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (300 * 400)
        assert (frac - s).abs().max() < 0.02 * s + 2 * (300 + 400) / (300 * 400), (s, frac.min(), frac.max())
        assert abs(float(frac.mean()) - s) < 0.01 * s + 1e-3

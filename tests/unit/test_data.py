from __future__ import annotations

import pytest
import torch

from trainers.data import DataError, ensure_synthetic, load_imagefolder, load_split
from tests.conftest import tiny_dataset


def test_synthetic_is_deterministic_and_balanced():
    a = load_split(tiny_dataset(), "train")
    b = load_split(tiny_dataset(), "train")
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (96, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.bincount().tolist() == [16] * 6
    assert len(a.classes) == 6


def test_corrupt_image_error_names_the_file(tmp_path):
    root = ensure_synthetic(96, 48, 32, 0)
    import shutil

    shutil.copytree(root / "train", tmp_path / "train")
    bad = tmp_path / "train" / "circle" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as info:
        load_imagefolder(tmp_path / "train", 32)
    assert str(bad) in str(info.value) and "Remove or replace this file" in str(info.value)


def test_missing_imagefolder_split(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_imagefolder(tmp_path / "val", 32)


def test_lazy_imagefolder_equals_in_memory(tmp_path):
    root = ensure_synthetic(96, 48, 32, 0)
    eager = load_imagefolder(root / "train", 32, in_memory=True)
    lazy = load_imagefolder(root / "train", 32, in_memory=False)
    assert lazy.images.shape == eager.images.shape and torch.equal(lazy.labels, eager.labels)
    idx = torch.tensor([5, 0, 95, 5])
    assert torch.equal(lazy.images[idx], eager.images[idx])
    assert torch.equal(lazy.images[10:20], eager.images[10:20])


def test_lazy_imagefolder_trains_and_probes(tmp_path):
    """The loop and the probe index a lazy set exactly as a tensor."""
    import shutil

    from evaluators.linear_probe import linear_probe
    from trainers.pretrain import pretrain
    from trainers.sink import ListSink
    from tests.conftest import tiny_spec

    root = ensure_synthetic(96, 48, 32, 0)
    shutil.copytree(root, tmp_path / "data")
    spec = tiny_spec(epochs=1)
    spec["dataset"] = dict(spec["dataset"], name="imagefolder", root=str(tmp_path / "data"), in_memory=False)
    up = pretrain(spec, tmp_path / "pre", ListSink())
    assert up["epochs_trained"] == 1
    assert 0 <= linear_probe(spec, up, tmp_path / "probe", ListSink())["top1"] <= 100

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainers.data import DataError, ensure_synthetic, load_imagefolder, load_split
from tests.conftest import tiny_config


def test_synthetic_is_deterministic_and_balanced():
    a = load_split(tiny_config().dataset, "train")
    b = load_split(tiny_config().dataset, "train")
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
    with pytest.raises(DataError) as info:  # decoded at load when in memory (streamed: when it is drawn)
        load_imagefolder(tmp_path / "train", 32, in_memory=True)
    assert str(bad) in str(info.value) and "Remove or replace this file" in str(info.value)


def test_missing_imagefolder_split(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_imagefolder(tmp_path / "val", 32)


def test_lazy_imagefolder_equals_in_memory(tmp_path):
    root = ensure_synthetic(96, 48, 32, 0)
    eager = load_imagefolder(root / "train", 32, in_memory=True, native=True)
    lazy = load_imagefolder(root / "train", 32, in_memory=False, native=True)
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

    root = ensure_synthetic(96, 48, 32, 0)
    shutil.copytree(root, tmp_path / "data")
    cfg = tiny_config(epochs=1)
    cfg = replace(cfg, dataset=replace(cfg.dataset, name="imagefolder", root=str(tmp_path / "data"), in_memory=False))
    up = pretrain(cfg, tmp_path / "pre", ListSink())
    assert up.epochs_trained == 1
    assert 0 <= linear_probe(cfg, up, tmp_path / "probe", ListSink()).metrics["top1"] <= 100


def test_the_synthetic_set_trains_the_same_in_memory_or_streamed(tmp_path):
    """``in_memory`` is left out of a synthetic stage's identity because it cannot change the result:
    streamed, its S×S files are cropped on the device exactly as the in-memory array is."""
    from trainers.pretrain import pretrain
    from trainers.sink import ListSink

    losses = {}
    for mode in (True, False):
        cfg = tiny_config(epochs=1)
        cfg = replace(cfg, dataset=replace(cfg.dataset, in_memory=mode, workers=1))
        sink = ListSink()
        pretrain(cfg, tmp_path / str(mode), sink)
        losses[mode] = sink.series("loss")
    assert losses[True] == losses[False]


def test_every_imagefolder_image_gets_the_torchvision_view(tmp_path):
    """In a user's ImageFolder, an image that happens to be S×S is evaluated like the others:
    Resize(S·256/224) + CenterCrop(S), not as it is (only the synthetic set is taken as it is)."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    for split in ("train", "val"):
        for cls, size in (("a", (500, 375)), ("b", (224, 224))):
            (tmp_path / split / cls).mkdir(parents=True)
            arr = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / split / cls / "x.png")
    data = load_imagefolder(tmp_path / "val", 224)
    got = data.images[torch.tensor([1])][0].permute(1, 2, 0).numpy().astype(int)
    with Image.open(tmp_path / "val" / "b" / "x.png") as im:
        ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(im.convert("RGB")), int)
    assert np.abs(got - ref).max() <= 1


def test_in_memory_is_in_an_imagefolder_stages_identity_only(tmp_path):
    from pipeline.spec import DatasetSpec, dataset_identity

    assert "in_memory" not in dataset_identity(DatasetSpec(name="synthetic", in_memory=False))
    folder = DatasetSpec(name="imagefolder", root="/data")
    assert dataset_identity(folder)["in_memory"] is None  # streamed: new since the streaming path
    # true reproduces what every ImageFolder stage did before it (legacy): those keep their keys
    assert "in_memory" not in dataset_identity(DatasetSpec(name="imagefolder", root="/data", in_memory=True))

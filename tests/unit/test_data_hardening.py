"""Messy ImageFolder trees and unusual image files (issue 11, section 1): the class list is one list,
hidden folders are not classes, splits must agree, and every PIL mode decodes on its own 0–255 scale."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.spec import DatasetSpec
from trainers.data import (DataError, _load_image, imagefolder_classes, load_imagefolder, load_split, open_rgb)
from trainers.loader import CropDataset
from trainers.augment import AugmentParams

COLOURS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def _tree(root: Path, splits: dict[str, tuple[str, ...]], per_class: int = 2) -> Path:
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), COLOURS[cls]).save(root / split / cls / f"{i}.png")
    return root


def _imagefolder(root: Path) -> DatasetSpec:
    return DatasetSpec(name="imagefolder", root=str(root), image_size=8, in_memory=True)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    root = _tree(tmp_path, {"train": ("a", "b", "c"), "val": ("a", "b", "c")})
    (root / "train" / ".ipynb_checkpoints").mkdir()  # the example: it shifted every label by one
    (root / "train" / "a" / "._0.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS resource fork, not an image
    (root / "val" / "b" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "val" / "b" / ".thumbs" / "0.png")
    train, val = load_split(_imagefolder(root), "train"), load_split(_imagefolder(root), "val")
    assert train.classes == val.classes == ("a", "b", "c")
    assert len(train) == len(val) == 6
    # labels mean the same class in both splits: a pixel's colour gives its label
    for data in (train, val):
        for img, label in zip(data.images, data.labels):
            assert tuple(img[:, 0, 0].tolist()) == COLOURS[data.classes[label]]


def test_a_split_with_other_classes_is_refused_naming_the_folders(tmp_path):
    root = _tree(tmp_path, {"train": ("a", "b", "c"), "val": ("b", "c")})
    with pytest.raises(DataError) as err:
        imagefolder_classes(root)
    text = str(err.value)
    assert f"{root / 'val'} has different classes from {root / 'train'}" in text and "missing from val/: a/" in text
    with pytest.raises(DataError, match="missing from val/: a/"):
        load_split(_imagefolder(root), "val")  # a stage run directly refuses too, instead of shifting labels
    root2 = _tree(tmp_path / "extra", {"train": ("a", "b"), "val": ("a", "b", "c")})
    with pytest.raises(DataError, match=r"not in train/: c/"):
        imagefolder_classes(root2)


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _tree(tmp_path, {"train": ("a", "b"), "val": ("a", "b")})
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    (root / "val" / "c" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        imagefolder_classes(root)
    assert f"{root / 'train'}: class folders with no image files" in str(err.value) and "c/" in str(err.value)
    assert f"{root / 'val'}: class folders with no image files" in str(err.value)


def test_images_in_sub_folders_of_a_class_are_found_as_torchvision_does(tmp_path):
    import torchvision

    root = _tree(tmp_path, {"train": ("a", "b"), "val": ("a", "b")})
    (root / "train" / "a" / "more").mkdir()
    Image.new("RGB", (8, 8), COLOURS["a"]).save(root / "train" / "a" / "more" / "x.png")
    ours = load_imagefolder(root / "train", 8, in_memory=False)
    theirs = torchvision.datasets.ImageFolder(str(root / "train"))
    assert [Path(p) for p, _ in theirs.samples] == ours.images.files
    assert ours.labels.tolist() == [t for _, t in theirs.samples]
    assert ours.classes == tuple(theirs.classes)


def test_sslgrid_run_refuses_a_mismatched_tree_before_launch(tmp_path, monkeypatch):
    from pipeline.cli import main

    root = _tree(tmp_path / "data", {"train": ("a", "b", "c"), "val": ("b", "c")})
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\ndefaults:\n  dataset: {{name: imagefolder, root: {root}, image_size: 8}}\n"
                    f"  pretrain: {{method: none}}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(grid), "--workdir", str(tmp_path / "wd")]) == 2
    assert not (tmp_path / "wd").exists() and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------
# PIL modes: every mode a dataset file can hold, at mid-grey, through both decoders


def _mid_grey_files(folder: Path) -> dict[str, Path]:
    """One 8×8 mid-grey file per (mode, format) a dataset can hold; value 50% of each mode's range."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name: str, im: Image.Image, ext: str) -> None:
        out[name] = folder / f"{name}.{ext}"
        im.save(out[name])

    g16 = np.full((8, 8), 32896, np.uint16)  # 128 · 257
    save("I;16-png", Image.fromarray(g16), "png")
    save("I;16-tiff", Image.fromarray(g16), "tiff")
    save("L-png", Image.new("L", (8, 8), 128), "png")
    save("LA-png", Image.new("LA", (8, 8), (128, 255)), "png")
    save("1-png", Image.new("1", (8, 8), 1), "png")
    save("P-png", Image.new("RGB", (8, 8), (128, 128, 128)).convert("P", palette=Image.Palette.ADAPTIVE), "png")
    save("RGBA-png", Image.new("RGBA", (8, 8), (128, 128, 128, 255)), "png")
    save("RGB-jpg", Image.new("RGB", (8, 8), (128, 128, 128)), "jpg")
    save("L-jpg", Image.new("L", (8, 8), 128), "jpg")
    save("CMYK-jpg", Image.new("CMYK", (8, 8), (0, 0, 0, 127)), "jpg")
    save("CMYK-tiff", Image.new("CMYK", (8, 8), (0, 0, 0, 127)), "tiff")
    save("LAB-tiff", Image.new("LAB", (8, 8), (137, 128, 128)), "tiff")  # L* = 53.6: sRGB grey 128
    save("YCbCr-tiff", Image.new("YCbCr", (8, 8), (128, 128, 128)), "tiff")
    save("RGB-webp", Image.new("RGB", (8, 8), (128, 128, 128)), "webp")
    save("RGB-bmp", Image.new("RGB", (8, 8), (128, 128, 128)), "bmp")
    return out


@pytest.mark.parametrize("name", [
    "I;16-png", "I;16-tiff", "L-png", "LA-png", "1-png", "P-png", "RGBA-png", "RGB-jpg", "L-jpg", "CMYK-jpg",
    "CMYK-tiff", "LAB-tiff", "YCbCr-tiff", "RGB-webp", "RGB-bmp"])
def test_every_mode_decodes_on_its_own_scale(tmp_path, name):
    path = _mid_grey_files(tmp_path)[name]
    expected = 255 if name == "1-png" else 128
    with Image.open(path) as im:
        assert im.mode.split("-")[0] == name.split("-")[0] or name.startswith("I;16")
    for pixels in (np.asarray(open_rgb(path)), _load_image(path, 8, native=True),
                   CropDataset([path], np.zeros(1, np.int64), [AugmentParams()], 8, seed=0)[(0, 0)][0][0]):
        assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
        assert np.abs(pixels.astype(int) - expected).max() <= 2, (name, pixels[0, 0])


def test_a_16_bit_ramp_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 4).astype(np.uint16).reshape(4, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(open_rgb(tmp_path / "ramp.png"))[..., 0]
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") clipped 99.6% to 255
    np.testing.assert_allclose(rgb, np.round(ramp / 257.0), atol=1)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_pixels_without_a_range_are_refused_naming_the_file(tmp_path, mode):
    arr = np.full((8, 8), 1000, np.int32 if mode == "I" else np.float32)
    Image.fromarray(arr).save(tmp_path / "x.tiff")
    for read in (lambda: open_rgb(tmp_path / "x.tiff"), lambda: _load_image(tmp_path / "x.tiff", 8),
                 lambda: CropDataset([tmp_path / "x.tiff"], np.zeros(1, np.int64), [AugmentParams()], 8, 0)[(0, 0)]):
        with pytest.raises(DataError, match=rf"{tmp_path / 'x.tiff'}: .*PIL mode {mode}.*Convert this file"):
            read()


def test_16_bit_png_read_as_mode_I_by_older_pil_is_scaled_too():
    from trainers.data import to_rgb

    im = Image.fromarray(np.full((4, 4), 32896, np.int32))  # mode I, as PIL < 10 opened 16-bit PNGs
    im.format = "PNG"
    assert (np.asarray(to_rgb(im, "x.png")) == 128).all()
    im.format = "TIFF"
    with pytest.raises(DataError, match="x.tiff: 32-bit integer pixels"):
        to_rgb(im, "x.tiff")

"""``dataset.name: fashion_mnist`` (issue 20, item 3): Debian's idx files (or a ``root``) read by
torchvision, upsampled to ``image_size`` and repeated to 3 channels; a missing folder refused
before launch. The tests on the real files need Debian's dataset-fashion-mnist: .ci/run installs
it, and under CI its absence fails instead of skipping."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.spec import DatasetSpec
from trainers import fashion_mnist
from trainers.data import DataError, cache_dir, load_split

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _real_root() -> Path:
    if not fashion_mnist.DEFAULT_ROOT.is_dir():
        why = f"{fashion_mnist.DEFAULT_ROOT} is missing (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)
    return fashion_mnist.DEFAULT_ROOT


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An idx file as LeCun's MNIST page specifies it: magic (0, 0, dtype 0x08 = ubyte, ndim), then
    each dimension as a big-endian int32, then the bytes."""
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape) \
        + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _tiny_set(folder: Path, gz: bool = True, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    """Four idx files of random 28×28 images and labels 0..9 in ``folder``; returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(folder / name, array, gz)
    return arrays


def _spec(root: Path | None, **kw) -> DatasetSpec:
    return DatasetSpec(name="fashion_mnist", root=None if root is None else str(root), **kw)


# ---------------------------------------------------------------------------------------------
# the real files


def test_both_real_splits_have_the_published_shapes_labels_and_classes():
    _real_root()
    train, val = load_split(_spec(None), "train"), load_split(_spec(None), "val")
    for data, n in ((train, 60_000), (val, 10_000)):
        assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
        assert torch.bincount(data.labels).tolist() == [n // 10] * 10  # 6,000 and 1,000 per class (Xiao et al.)
        assert data.classes == CLASSES
        assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(data.images[:, 0], data.images[:, 2])
    assert not torch.equal(train.images[:100], val.images[:100])  # val is the test split, not train again


def test_real_images_are_torchvisions_resize_of_torchvisions_own_reading():
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    _real_root()
    root = fashion_mnist.unpacked_root(fashion_mnist.find_files(None), cache_dir())
    theirs = torchvision.datasets.FashionMNIST(str(root), train=False, download=False)
    ours = {s: load_split(_spec(None, image_size=s, max_val=50), "val") for s in (28, 32, 64)}
    for i in (0, 7, 49):
        pil, label = theirs[i]  # PIL "L", 28×28
        grey = TF.pil_to_tensor(pil)  # 1×28×28 uint8
        assert torch.equal(ours[28].images[i], grey.expand(3, -1, -1))  # at 28 px: the stored pixels
        for s in (32, 64):
            want = TF.resize(grey, [s, s], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            assert torch.equal(ours[s].images[i], want.expand(3, -1, -1)), (i, s)
        assert int(ours[32].labels[i]) == label


# ---------------------------------------------------------------------------------------------
# a tiny set in the same format, so the reader's behaviour is tested without the package


@pytest.mark.parametrize("gz", [True, False])
def test_a_root_of_idx_files_gz_or_not_is_read_as_written(tmp_path, gz):
    arrays = _tiny_set(tmp_path / "fm", gz=gz)
    train = load_split(_spec(tmp_path / "fm", image_size=28), "train")
    val = load_split(_spec(tmp_path / "fm", image_size=28), "val")
    assert train.images.shape == (12, 3, 28, 28) and val.images.shape == (6, 3, 28, 28)
    assert np.array_equal(train.images[:, 1].numpy(), arrays["train-images-idx3-ubyte"])
    assert train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert np.array_equal(val.images[:, 2].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert val.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_torchvisions_download_layout_under_root_is_found(tmp_path):
    arrays = _tiny_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    val = load_split(_spec(tmp_path / "tv", image_size=28), "val")
    assert np.array_equal(val.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_upsampling_is_torchvisions_resize_of_each_image(tmp_path):
    from torchvision.transforms.v2 import functional as TF

    arrays = _tiny_set(tmp_path / "fm")
    up = load_split(_spec(tmp_path / "fm", image_size=40), "train")
    assert up.images.shape == (12, 3, 40, 40)
    for i in range(12):
        grey = torch.from_numpy(arrays["train-images-idx3-ubyte"][i].astype(np.uint8))[None]  # 1×28×28
        want = TF.resize(grey, [40, 40], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(up.images[i], want.expand(3, -1, -1))


def test_max_train_and_max_val_take_the_first_images(tmp_path):
    _tiny_set(tmp_path / "fm")
    full_train, full_val = (load_split(_spec(tmp_path / "fm"), s) for s in ("train", "val"))
    train = load_split(_spec(tmp_path / "fm", max_train=5), "train")
    val = load_split(_spec(tmp_path / "fm", max_val=4), "val")
    assert torch.equal(train.images, full_train.images[:5]) and train.labels.tolist() == full_train.labels[:5].tolist()
    assert torch.equal(val.images, full_val.images[:4]) and val.labels.tolist() == full_val.labels[:4].tolist()


def test_the_files_are_unzipped_once_and_again_when_they_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLGRID_CACHE", str(tmp_path / "cache"))
    _tiny_set(tmp_path / "fm")
    first = fashion_mnist.unpacked_root(fashion_mnist.find_files(tmp_path / "fm"), cache_dir())
    stamp = (first / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_mtime_ns
    again = fashion_mnist.unpacked_root(fashion_mnist.find_files(tmp_path / "fm"), cache_dir())
    assert again == first and (again / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [first.name]  # no temporary left over
    arrays = _tiny_set(tmp_path / "fm", n_train=14)  # new files: a new copy, and the new images
    train = load_split(_spec(tmp_path / "fm", image_size=28), "train")
    assert len(train) == 14 and np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])


def test_a_truncated_gzip_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLGRID_CACHE", str(tmp_path / "cache"))
    _tiny_set(tmp_path / "fm")
    bad = tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=str(bad)):
        load_split(_spec(tmp_path / "fm"), "val")
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").iterdir())


# ---------------------------------------------------------------------------------------------
# missing files: refused, naming the folder and the fix


def test_a_missing_root_is_a_data_error_naming_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_split(_spec(tmp_path / "nowhere"), "train")
    text = str(err.value)
    assert str(tmp_path / "nowhere") in text and "no such folder" in text
    assert "apt-get install dataset-fashion-mnist" in text and "dataset.root" in text
    (tmp_path / "half").mkdir()
    _tiny_set(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_split(_spec(tmp_path / "half"), "train")


def _grid(tmp_path: Path, root: Path) -> Path:
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\ndefaults:\n  dataset: {{name: fashion_mnist, root: {root}}}\n"
                    f"  pretrain: {{method: none}}\n")
    return grid


def test_sslgrid_run_refuses_a_missing_fashion_root_with_exit_2_before_launch(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    grid = _grid(tmp_path, tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(grid), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert f"dataset.root = '{tmp_path / 'nowhere'}': {tmp_path / 'nowhere'}: Fashion-MNIST is not there" in err
    assert "apt-get install dataset-fashion-mnist" in err and "nothing was launched" in err
    assert not (tmp_path / "wd").exists() and not (tmp_path / "mlflow.db").exists()
    assert main(["plan", str(grid)]) == 0  # plan warns, as for any data problem
    assert "sslgrid run` will refuse" in " ".join(capsys.readouterr().out.split())


def test_data_problems_passes_a_root_that_holds_the_files(tmp_path):
    from pipeline.grid import data_problems, load_grid

    _tiny_set(tmp_path / "fm")
    assert data_problems(load_grid(_grid(tmp_path, tmp_path / "fm"))) == []
    problems = data_problems(load_grid(_grid(tmp_path, tmp_path / "nowhere")))
    assert [p.field for _, p in problems] == ["dataset.root"]


def test_the_name_is_a_valid_choice_and_a_near_miss_is_named(tmp_path):
    from pipeline.grid import GridError, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\ndefaults:\n  dataset: {name: fashion}\n  pretrain: {method: none}\n")
    with pytest.raises(GridError, match="did you mean 'fashion_mnist'"):
        load_grid(grid)


def test_a_copied_real_root_reads_the_same_images(tmp_path):
    src = _real_root()
    for f in src.iterdir():  # the Debian files, unzipped by hand: "root: .gz or not"
        with gzip.open(f) as fin, open(tmp_path / f.name.removesuffix(".gz"), "wb") as fout:
            shutil.copyfileobj(fin, fout)
    ours = load_split(_spec(tmp_path, max_val=200), "val")
    debian = load_split(_spec(None, max_val=200), "val")
    assert torch.equal(ours.images, debian.images) and torch.equal(ours.labels, debian.labels)


def test_sslgrid_plan_checks_the_files_without_torch(tmp_path):
    """A login node without torch: plan names the missing Fashion-MNIST folder and reads none of it."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "from pipeline.cli import main\n"
            "print('code', main(['plan', 'grids/quickstart.yaml', '-o', 'dataset.name=fashion_mnist', '-o',\n"
            "                    f'dataset.root={sys.argv[1]}/nowhere', '--workdir', sys.argv[1] + '/wd']))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=repo, capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "code 0" in text, out.stdout[-3000:] + out.stderr
    assert "Fashion-MNIST is not there (no such folder)" in text and "apt-get install dataset-fashion-mnist" in text

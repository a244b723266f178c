"""The training data path (trainers/loader.py): per-rank shares, crops of the originals, the
evaluation view, DataLoader workers with resume, mixed precision and the process group."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tests.conftest import tiny_config
from tests.unit.test_loop import assert_resume_matches_uninterrupted
from trainers import checkpoint
from trainers import distributed as D
from trainers.augment import AugmentParams
from trainers.data import _load_image, ensure_jpeg_tree, load_imagefolder
from trainers.loader import StreamingBatches, epoch_order, local_steps
from trainers.loop import epoch_generator
from trainers.pretrain import pretrain
from trainers.sink import ListSink

if TYPE_CHECKING:
    from pipeline.spec import StageConfig


def jpeg_config(tmp_path: Path, epochs: int = 2, workers: int = 0, n_train: int = 48, **pretrain_fields) -> StageConfig:
    """tiny_config on an ImageNet-like JPEG tree (80×60 originals, streamed) of ``n_train`` images."""
    root = ensure_jpeg_tree(n_train, 12, size=(80, 60))
    cfg = tiny_config(epochs=epochs, batch_size=16, K=16, **pretrain_fields)
    return replace(cfg, dataset=replace(cfg.dataset, name="imagefolder", root=str(root), image_size=32,
                                        in_memory=None, workers=workers))


def test_jpeg_trees_stream_and_native_trees_stay_in_memory():
    root = ensure_jpeg_tree(12, 6, size=(80, 60))
    streamed = load_imagefolder(root / "train", 32)
    assert not isinstance(streamed.images, torch.Tensor)  # originals of other sizes: streamed, cropped by workers
    assert streamed.images[torch.tensor([0, 3])].shape == (2, 3, 32, 32)


def test_val_view_is_resize_then_centre_crop(tmp_path):
    """The evaluation view of a 500×375 image is torchvision's Resize(256) + CenterCrop(224) (moco
    main_lincls's val transform), to within 1/255, for PNG and JPEG; scaled for other sizes."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(arr).resize((500, 375), Image.Resampling.BILINEAR))
    for name in ("a.png", "a.jpg"):
        Image.fromarray(arr).save(tmp_path / name, quality=90)
        with Image.open(tmp_path / name) as im:
            ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(im.convert("RGB")), np.int16)
        ours = _load_image(tmp_path / name, 224).astype(np.int16)
        assert ours.shape == (224, 224, 3) and np.abs(ours - ref).max() <= 1, name
    with Image.open(tmp_path / "a.png") as im:  # at 112 px: Resize(128) + CenterCrop(112)
        ref = np.asarray(T.Compose([T.Resize(128), T.CenterCrop(112)])(im.convert("RGB")), np.int16)
    assert np.abs(_load_image(tmp_path / "a.png", 112).astype(np.int16) - ref).max() <= 1


def test_each_rank_decodes_only_its_share(monkeypatch):
    """With 2 ranks, each decodes exactly its half of every global batch, and together they cover
    it once."""
    root = ensure_jpeg_tree(48, 12, size=(80, 60))
    data = load_imagefolder(root / "train", 32)
    order = epoch_order(len(data), epoch_generator(0, 0))
    seen = {}
    for rank in range(2):
        monkeypatch.setattr(D, "world", lambda rank=rank: D.World(rank, 2))
        batches = StreamingBatches(data.images.files, data.labels, (AugmentParams(), AugmentParams()), 32, 0,
                                   torch.device("cpu"), workers=0)
        steps = local_steps(order, 16)
        seen[rank] = [idx.tolist() for _, _, idx in batches.epoch(0, steps)]
        assert batches.dataset.decodes == 3 * 8  # 3 steps of 16, half each
    for i in range(3):
        assert sorted(seen[0][i] + seen[1][i]) == sorted(order[16 * i:16 * (i + 1)].tolist())


@pytest.mark.parametrize("workers", [0, 1])
def test_a_rank_without_rows_gets_an_empty_batch_from_the_stream(monkeypatch, workers):
    """The probe keeps the last partial batch: 49 images at batch 16 in 2 processes leave rank 1 no
    row of the last step. The streamed path must still give it that step, empty, in its place, and
    the next epoch must read normally (the persistent workers were not left mid-epoch)."""
    root = ensure_jpeg_tree(49, 12, size=(80, 60))
    data = load_imagefolder(root / "train", 32)
    monkeypatch.setattr(D, "world", lambda: D.World(1, 2))
    batches = StreamingBatches(data.images.files, data.labels, (AugmentParams(),), 32, 0, torch.device("cpu"),
                               workers=workers)
    try:
        for epoch in range(2):
            steps = local_steps(epoch_order(49, epoch_generator(0, epoch)), 16, drop_last=False)
            out = list(batches.epoch(epoch, steps))
            assert [len(idx) for _, _, idx in out] == [8, 8, 8, 0]
            assert [idx.tolist() for _, _, idx in out] == [s.tolist() for s in steps]
            views, y, idx = out[-1]
            assert views[0].shape == (0, 3, 32, 32) and views[0].dtype == torch.float32
            assert y.dtype == idx.dtype == torch.int64
    finally:
        batches.close()


def test_two_processes_match_one_on_streamed_jpegs(tmp_path):
    """The streamed path keeps W processes equal to one: 2 gloo processes (each reading its half)
    against 1 with the same global batch, one step apart at most by summation order."""
    import torch.multiprocessing as mp
    from tests.unit.test_distributed import _free_port, _worker

    cfg = jpeg_config(tmp_path, epochs=1, n_train=32)
    torch.set_num_threads(1)
    one = ListSink()
    pretrain(cfg, tmp_path / "one", one)
    mp.spawn(_worker, args=(2, _free_port(), cfg, str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert two == pytest.approx(one.series("loss"), rel=1e-5)
    a = checkpoint.load(tmp_path / "one" / "checkpoints" / "last.pt")["model"]["queue"]
    b = checkpoint.load(tmp_path / "two" / "checkpoints" / "last.pt")["model"]["queue"]
    assert torch.allclose(a, b, atol=1e-5)


def test_resume_with_dataloader_workers_matches_uninterrupted(tmp_path):
    """Streamed JPEGs decoded by 2 persistent DataLoader workers: a run killed after epoch 1 resumes
    to the same per-epoch losses and weights as an uninterrupted one."""
    assert_resume_matches_uninterrupted(jpeg_config(tmp_path, epochs=3, workers=2), tmp_path)


def test_bf16_step_on_cpu_is_close_to_fp32(tmp_path):
    """One epoch of MoCo v2 under bf16 autocast on the CPU: the mean loss is within 2% of fp32's
    (bf16 keeps 8 bits of mantissa in the convolutions; the loss itself is computed in fp32)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        sink = ListSink()
        pretrain(tiny_config(epochs=1, precision=precision), tmp_path / precision, sink)
        losses[precision] = sink.series("loss")[0]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02), losses
    assert losses["bf16"] != losses["fp32"]  # autocast did run


def test_backend_serves_both_device_types():
    assert D.backend_for(cuda=False) == "gloo"
    assert D.backend_for(cuda=True) == "cpu:gloo,cuda:nccl"  # CPU tensors through gloo, CUDA through NCCL


def _collective_worker(rank: int, port: int, backend: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_from_env(backend)
    try:
        value = D.all_mean(torch.tensor([float(rank)]))
        result = {"mean": value.item()}
    except Exception as err:  # noqa: BLE001 (the message is the assertion)
        result = {"error": str(err)}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend, ok", [("cuda:gloo", False), ("cpu:gloo,cuda:gloo", True)])
def test_cpu_collectives_need_a_cpu_backend(tmp_path, backend, ok):
    """The crash of epoch 1 on GPUs, reproduced on a CPU: a group whose only backend serves the cuda
    device refuses a CPU tensor; one mapped like ``backend_for(cuda=True)`` serves it."""
    import torch.multiprocessing as mp
    from tests.unit.test_distributed import _free_port

    out = tmp_path / "r.json"
    mp.spawn(_collective_worker, args=(_free_port(), backend, str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    if ok:
        assert result == {"mean": 0.5}
    else:
        assert "No backend type associated with device type cpu" in result["error"]

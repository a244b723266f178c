"""The GPU paths' own defects (issue 19), checked on a CPU: no host-to-device constant built per
augmentation call, split BatchNorm that keeps channels_last, hard negatives drawn where the queue
is, the /dev/shm fallback of the streaming loader, and JPEG decoding on the device
(``dataset.decode: cuda``), whose code runs here with the CPU as its device."""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.augment import DRAWS, AugmentParams, photometric
from trainers.backbones import SplitBatchNorm2d, _SplitBatchNorm
from trainers.data import ensure_jpeg_tree, load_imagefolder
from trainers.negatives import device_generator, hard_negative_index, skewnorm_ranks

# ---------------------------------------------------------------------------------------------
# augmentation: nothing copied from the host per call


def test_a_second_augmentation_builds_no_tensor_from_a_python_list(monkeypatch):
    """On CUDA, torch.tensor([...], device=...) is a copy that waits for the device; hue_shift made
    one per call (about 48 per MoCo v2 step). After a first call (per-device constants are cached),
    colour jitter with every operation on, grayscale, blur and flip must make none."""
    from trainers.loader import augmented_views

    p = AugmentParams(jitter_p=1.0, grayscale_p=0.5, blur_p=0.5)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 3, 20, 24, generator=g) * 255).to(torch.uint8)
    u = torch.rand(16, DRAWS, generator=g, dtype=torch.float64)
    photometric(x[:, :, :16, :16].clone(), u, p)
    augmented_views(x, torch.arange(16), 0, 0, (p, p), 16)
    made = []
    real = torch.tensor

    def spy(data, *args, **kwargs):
        if isinstance(data, (list, tuple)):
            made.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    photometric(x[:, :, :16, :16].clone(), u, p)
    augmented_views(x, torch.arange(16), 0, 0, (p, p), 16)
    assert made == []


# ---------------------------------------------------------------------------------------------
# split BatchNorm


# the implementation before issue 19 (moco's CIFAR demo), kept as the benchmark's reference
from bench.split_bn import ReshapeSplitBatchNorm2d  # noqa: E402


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_split_bn_gives_the_reshape_numbers_and_keeps_the_layout(layout):
    torch.manual_seed(0)
    ref, ours = ReshapeSplitBatchNorm2d(6, 4), SplitBatchNorm2d(6, 4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(ref.state_dict())
    for step in range(3):  # the running statistics move the same way over several steps
        x = (torch.randn(8, 6, 5, 7) * 3 + 1).contiguous(memory_format=layout)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
        assert yb.is_contiguous(memory_format=layout) and xb.grad.is_contiguous(memory_format=layout)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, atol=1e-4, rtol=1e-5)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_split_bn_gradient_is_exact_in_float64():
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _SplitBatchNorm.apply(x, w, b, 2, 1e-5)[0], (x, w, b))


def test_split_bn_output_can_be_rectified_in_place_under_bf16():
    """The ReLU after every BatchNorm of a ResNet works in place; under bf16 autocast the output
    stays bf16 and channels_last."""
    net = nn.Sequential(SplitBatchNorm2d(4, 2), nn.ReLU(inplace=True))
    x = torch.randn(4, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x.bfloat16())
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last) and x.grad is not None


# ---------------------------------------------------------------------------------------------
# hard negatives


def rand_unit(*shape, dim=1, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def test_cpu_hard_negatives_are_the_ones_drawn_before_issue_19():
    """The CPU path draws from the step's generator as before, number for number (values pinned from
    the code before the device path was added)."""
    g = torch.Generator().manual_seed(0)
    idx = hard_negative_index(rand_unit(8, 16, seed=1), rand_unit(16, 512, dim=0, seed=2), 4.0, 0.0, 0.4, g)
    assert hashlib.sha1(idx.numpy().tobytes()).hexdigest() == "00554e6e7f749beb92a11494e56f37b502d15d2e"
    assert idx[0, :8].tolist() == [348, 2, 41, 443, 62, 208, 471, 375]
    assert float(torch.rand(1, generator=g)) == 0.48332923650741577  # g is left where it was left before
    ranks = skewnorm_ranks(4, 1000, 4.0, 0.0, 0.4, torch.Generator().manual_seed(5))
    assert hashlib.sha1(ranks.numpy().tobytes()).hexdigest() == "ccb5018a55b11d8544598ce79f7cc991d46f1f29"


def test_the_device_generator_takes_one_number_from_the_steps_generator():
    """Off the CPU the ranks come from a generator on the queue's device, seeded by one draw of the
    step's CPU generator (no host synchronisation, and a resumed run replays it); here with the CPU
    standing in for the device, its ranks keep the sampler's shape."""
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    dg = device_generator(g, torch.device("cpu"))
    torch.randint(0, 2**63 - 1, (1,), generator=twin)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=twin))
    again = device_generator(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(torch.rand(8, generator=dg), torch.rand(8, generator=again))
    K = 4096
    frac = skewnorm_ranks(16, K, 4.0, 0.0, 0.4, device_generator(g, torch.device("cpu"))).float() / K
    assert frac.shape == (16, K) and 0 <= frac.min() and frac.max() < 1
    assert 0.5 < float((frac < 1 / 3).float().mean()) < 0.7 and 0.1 < float((frac >= 0.5).float().mean()) < 0.3


# ---------------------------------------------------------------------------------------------
# the streaming loader's /dev/shm


def _stream(workers: int = 1, **kw):
    from trainers.loader import StreamingBatches

    root = ensure_jpeg_tree(16, 4, size=(40, 30))
    data = load_imagefolder(root / "train", 16)
    sb = StreamingBatches(data.images.files, data.labels, (AugmentParams(), AugmentParams()), 16, 0,
                          torch.device("cpu"), workers=workers, prefetch=2, **kw)
    steps = [torch.arange(8), torch.arange(8, 16)]
    try:
        return sb, [views for views, _, _ in sb.epoch(0, steps)]
    finally:
        sb.close()


def test_a_small_dev_shm_sends_batches_through_pipes_with_a_warning(monkeypatch):
    """1 worker × prefetch 2 × two float 3×16×16 views of 8 images (48 KiB) × 1.5 needs 0.1 MiB of
    /dev/shm; with 0.05 MiB free the batches go through the workers' pipes, warned with the numbers,
    and they are the same batches."""
    import trainers.loader as L

    roomy, expected = _stream()
    assert not roomy.through_pipe
    monkeypatch.setattr(L, "shm_free_bytes", lambda: 50 * 1024)
    with pytest.warns(L.SharedMemoryWarning) as caught:
        small, got = _stream()
    text = str(caught[0].message)
    assert small.through_pipe
    assert "/dev/shm has 0.0 MiB free" in text and "needs about 0.1 MiB" in text, text
    assert "1 workers × prefetch 2" in text and "SIGBUS" in text and "--shm-size" in text, text
    for a, b in zip(got, expected):
        for va, vb in zip(a, b):
            assert torch.equal(va, vb)


def test_enough_dev_shm_keeps_shared_memory_silently(monkeypatch):
    import trainers.loader as L

    monkeypatch.setattr(L, "shm_free_bytes", lambda: 1 << 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", L.SharedMemoryWarning)
        sb, _ = _stream()
    assert not sb.through_pipe


# ---------------------------------------------------------------------------------------------
# decoding on the device


def _bytes_batch(files, labels, n):
    from trainers.decode import FileBytes, collate_bytes

    fb = FileBytes(files, labels)
    return collate_bytes([fb[(0, i)] for i in range(n)])


def test_device_decoding_cuts_torchvision_crops_of_the_original():
    """Each view's crop is torchvision's resized_crop (bilinear, antialiased) of the decoded original
    with the keyed RandomResizedCrop box, drawn on the original's size; and it is the PIL worker
    path's crop to within 1 level of 255 (80×60 originals at 32 px: no reduced DCT scale)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_jpeg, read_file

    from trainers.augment import crop_boxes
    from trainers.decode import decode_crops
    from trainers.keyed import uniforms
    from trainers.loader import CropDataset

    root = ensure_jpeg_tree(8, 2, size=(80, 60))
    data = load_imagefolder(root / "train", 32)
    views = (AugmentParams(), AugmentParams(crop_scale=(0.08, 1.0)))
    payloads, is_jpeg, y, idx = _bytes_batch(data.images.files, data.labels, 8)
    crops = decode_crops(payloads, is_jpeg, idx, 0, 0, views, 32, torch.device("cpu"))
    pil = CropDataset(data.images.files, data.labels, views, 32, 0)
    for i in range(8):
        original = decode_jpeg(read_file(str(data.images.files[i])))
        h, w = original.shape[1:]
        worker = pil[(0, i)][0]
        for v, p in enumerate(views):
            x1, y1, x2, y2 = crop_boxes(uniforms(0, 0, [i], v, 22), h, w, p.crop_scale, p.crop_ratio)[0].long().tolist()
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert p.crop_scale[0] - 0.03 < (x2 - x1) * (y2 - y1) / (h * w) < p.crop_scale[1] + 0.03
            ref = TF.resized_crop(original, y1, x1, y2 - y1, x2 - x1, [32, 32], antialias=True)
            assert torch.equal(crops[v][i], ref)
            diff = (crops[v][i].int() - torch.from_numpy(np.asarray(worker[v]).copy()).permute(2, 0, 1).int()).abs()
            assert diff.max() <= 1


def test_other_formats_are_decoded_by_pil_in_the_workers(tmp_path):
    """A PNG among the JPEGs: the worker decodes it (PIL), the batch's JPEGs are decoded together."""
    from PIL import Image

    from trainers.decode import decode_crops

    root = ensure_jpeg_tree(8, 2, size=(80, 60))
    data = load_imagefolder(root / "train", 32)
    png = tmp_path / "x.png"
    Image.fromarray(np.full((50, 70, 3), 200, np.uint8)).save(png)
    files = list(data.images.files)[:4] + [png]
    payloads, is_jpeg, y, idx = _bytes_batch(files, torch.zeros(5, dtype=torch.int64), 5)
    assert is_jpeg == [True, True, True, True, False] and payloads[4].shape == (3, 50, 70)
    crops = decode_crops(payloads, is_jpeg, idx, 0, 0, (AugmentParams(),), 32, torch.device("cpu"))
    assert crops[0].shape == (5, 3, 32, 32) and crops[0].dtype == torch.uint8 and bool((crops[0][4] == 200).all())


def test_streaming_with_device_decoding_gives_the_worker_paths_views():
    """The whole path (workers read bytes, the process decodes, crops, colours) against the PIL
    worker path: the same samples, shapes and, up to the 1-level resampling difference, values."""
    _, pil = _stream(workers=0)
    _, dev = _stream(workers=1, decode_on=torch.device("cpu"))
    for a, b in zip(dev, pil):
        for va, vb in zip(a, b):
            assert va.shape == vb.shape == (8, 3, 16, 16) and va.dtype == torch.float32
            assert (va - vb).abs().mean() < 0.05  # normalised units: about 3 levels of 255 at std 0.225


def test_decode_cuda_is_refused_where_it_cannot_run():
    from trainers.data import ImageSet
    from trainers.loader import image_batches

    root = ensure_jpeg_tree(8, 2, size=(80, 60))
    streamed = load_imagefolder(root / "train", 32)
    views = (AugmentParams(),)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"dataset.decode = 'cuda', but this stage runs on cpu .*"
                                             r"set dataset.decode: cpu"):
            image_batches(streamed, views, 32, 0, torch.device("cpu"), decode="cuda")
    in_memory = ImageSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match=r"applies to streamed ImageFolders.*Set dataset.decode: cpu"):
        image_batches(in_memory, views, 32, 0, torch.device("cpu"), decode="cuda")


def test_decode_is_in_a_stages_identity_only_when_it_is_cuda():
    from pipeline.spec import Problem, build_stage_config, dataset_identity

    problems: list[Problem] = []
    cfg = build_stage_config({"dataset": {"name": "imagefolder", "root": "/data"}}, problems)
    assert not problems and cfg.dataset.decode == "cpu" and "decode" not in dataset_identity(cfg.dataset)
    assert dataset_identity(replace(cfg.dataset, decode="cuda"))["decode"] == "cuda"
    build_stage_config({"dataset": {"name": "imagefolder", "root": "/data", "decode": "gpu"}}, problems)
    assert [p.field for p in problems] == ["dataset.decode"] and "cpu, cuda" in problems[0].message

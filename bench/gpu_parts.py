"""The parts of bench/gpu_check.py, one function each: ``PART(fig, smoke, work)`` measures, and
writes every figure through ``fig`` (bench/figures.py) the moment it has it. Each runs in a process
of its own (gpu_check.py runs ``--part NAME``), so a crash or a hang loses that part alone.

Sizes: the real ones for one GPU (ResNet-50 at 224 px, batches of 128 or 256, the DataLoader
workers of a 16-core machine), or tiny ones with ``smoke`` (a CPU, tests/unit/test_gpu_check.py).
Everything here drives trainers/ and evaluators/ directly, with list-backed sinks: no Ray, MLflow,
submitit or ruamel.yaml (bench/gpu_image.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench import data_path, pretrain_step, split_bn
from bench.figures import Figures
from bench.steady import Meter, Rate, Window, loader_warmup
from trainers.sink import ListSink

HARD = (4.0, 0.0, 0.4)  # trainers/methods/base.py NegativesSpec's defaults (skew-normal shape, loc, scale)


def on_cuda() -> bool:
    return torch.cuda.is_available()


def dev() -> torch.device:
    return torch.device("cuda" if on_cuda() else "cpu")


@contextmanager
def shm_notes(fig: Figures) -> Iterator[None]:
    """The loaders' /dev/shm warnings (trainers/loader.py SharedMemoryWarning) inside the block, as
    notes of the part: whether a figure was measured with batches through pipes."""
    from trainers.loader import SharedMemoryWarning

    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always", SharedMemoryWarning)
        try:
            yield
        finally:
            for w in log:
                if issubclass(w.category, SharedMemoryWarning):
                    fig.note(f"warning: {w.message}")
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def rate_context(rate: Rate) -> dict[str, Any]:
    """What a steady figure was measured over, kept beside it in the JSON."""
    return {"timed_batches": rate.batches, "timed_seconds": round(rate.seconds, 3), "warmup_batches": rate.warmup,
            "capped": rate.capped}


def workers() -> int:
    """DataLoader workers, as a stage with this machine's CPUs gets them (all but one, at most 16)."""
    from trainers.loader import default_workers

    return default_workers(reserve=1)


# ---------------------------------------------------------------------------------------------
# the quickstart's recipes


def quickstart_specs(over: list[str]) -> dict[str, Any]:
    """The quickstart's stages (``cell:kind`` → planned Stage), resolved by the planner with
    ``over`` (``-o`` texts); a GPU per stage when CUDA is there, so precision auto means bf16."""
    from bench.yaml12 import install_ruamel_shim

    install_ruamel_shim()  # the GPU image has PyYAML, not ruamel.yaml
    from pipeline.grid import load_grid
    from pipeline.plan import build_plan

    repo = Path(__file__).resolve().parents[1]
    if on_cuda():
        over = over + ["resources.pretrain.gpus=1", "resources.linear_probe.gpus=1"]
    plan = build_plan(load_grid(repo / "grids" / "quickstart.yaml", over))
    stages = {}
    for cell, keys in plan.cells.items():
        for kind in ("pretrain", "linear_probe"):
            if kind in keys:
                stages[f"{cell}:{kind}"] = plan.stages[keys[kind]]
    return stages


def _cells(stages: dict[str, Any]) -> tuple[str, str]:
    """(the MoCo v2 + MLP cell, the random-init cell) of the quickstart, by their specs, not names."""
    pre = {k.rsplit(":", 1)[0]: s for k, s in stages.items() if k.endswith(":pretrain")}
    mlp = next(c for c, s in pre.items() if s.spec["pretrain"]["method"] == "mocov2"
               and s.spec["pretrain"].get("head", {}).get("kind") == "mlp")
    none = next(c for c, s in pre.items() if s.spec["pretrain"]["method"] == "none")
    return mlp, none


def quickstart(fig: Figures, smoke: bool, work: Path) -> None:
    """The quickstart's pretraining (MoCo v2 + MLP) and probe recipes, against a random init."""
    from evaluators.linear_probe import linear_probe
    from trainers.pretrain import pretrain

    over = ["pretrain.knn_every=0", "pretrain.epochs=1", "linear_probe.epochs=5", "pretrain.K=128",
            "dataset.num_train=256", "dataset.num_val=64"] if smoke else ["pretrain.knn_every=0", "pretrain.epochs=2"]
    stages = quickstart_specs(over)
    for cell in _cells(stages):
        pre = stages[f"{cell}:pretrain"]
        t = time.perf_counter()
        sink = ListSink()
        up = pretrain(pre.config, work / pre.key, sink)
        seconds = time.perf_counter() - t
        label = "mocov2_mlp" if cell == _cells(stages)[0] else "random_init"
        ips = sink.series("images_per_second")
        fig.add(f"{label}_pretrain_seconds", seconds, "s", cell=cell, epochs=pre.spec["pretrain"]["epochs"],
                precision=pre.spec["pretrain"]["precision"])
        if ips:
            fig.add(f"{label}_last_epoch_images_per_second", ips[-1], "images/s", cell=cell,
                    note="an epoch mean, loader start included")
        probe = stages[f"{cell}:linear_probe"]
        t = time.perf_counter()
        res = linear_probe(probe.config, up, work / probe.key, ListSink())
        fig.add(f"{label}_probe_top1", res.metrics["top1"], "%", cell=cell, seconds=round(time.perf_counter() - t, 2))


# ---------------------------------------------------------------------------------------------
# host synchronisations


@contextmanager
def sync_warnings() -> Iterator[list[str]]:
    """The messages of torch's host-synchronisation warnings inside the block (CUDA's sync debug
    mode, torch.cuda.set_sync_debug_mode("warn")); always empty without CUDA."""
    caught: list[str] = []
    if not on_cuda():
        yield caught
        return
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
    caught.extend(str(w.message).splitlines()[0] for w in log if "synchroniz" in str(w.message))


@contextmanager
def list_tensors() -> Iterator[list[str]]:
    """Calls of torch.tensor on a Python list or tuple inside the block (on CUDA each is a copy
    that waits for the device): where each came from. Works on a CPU too."""
    import traceback

    calls: list[str] = []
    real = torch.tensor

    def spy(data, *args, **kwargs):
        if isinstance(data, (list, tuple)):
            frame = traceback.extract_stack(limit=2)[0]
            calls.append(f"{Path(frame.filename).name}:{frame.lineno}")
        return real(data, *args, **kwargs)

    with mock.patch.object(torch, "tensor", spy):
        yield calls


def sync_count(fig: Figures, smoke: bool, work: Path) -> None:
    """Host synchronisations (CUDA sync debug mode) of the augmentation, in memory and streamed, for
    the quickstart's recipe (colour jitter off) and the paper's MoCo v2 aug-plus (colour on), and
    of a MoCo v2 training step, plain and with hard negatives; after one warm-up call each (caches of
    constants are made once).
    On a CPU only the proxy is measured: tensors built from Python lists (copies to the device)."""
    from trainers.augment import DRAWS, AugmentParams, photometric
    from trainers.keyed import uniforms
    from trainers.loader import augmented_views
    from trainers.pretrain import augment_params

    stages = quickstart_specs(["pretrain.knn_every=0"])
    mlp, _ = _cells(stages)
    quick = augment_params(stages[f"{mlp}:pretrain"].config.pretrain.augment)
    recipes = {"quickstart": (quick, 32, 256 if not smoke else 16),
               "mocov2_aug_plus": ((AugmentParams(), AugmentParams()), 32 if smoke else 224, 16 if smoke else 128)}
    d = dev()
    unit = "synchronisations" if on_cuda() else "synchronisations (not measurable without CUDA)"
    for name, (views, size, batch) in recipes.items():
        g = torch.Generator().manual_seed(0)
        originals = (torch.rand(batch, 3, size + size // 4, size + size // 3, generator=g) * 255).to(torch.uint8).to(d)
        crops = (torch.rand(batch, 3, size, size, generator=g) * 255).to(torch.uint8).to(d)
        idx = torch.arange(batch)

        def in_memory() -> None:
            augmented_views(originals, idx, 0, 0, views, size)

        def streamed() -> None:  # the device half of StreamingBatches: colour on decoded crops
            for v, p in enumerate(views):
                photometric(crops.float().div_(255), torch.from_numpy(uniforms(0, 0, idx.numpy(), v, DRAWS)), p)

        for path, fn in (("in_memory", in_memory), ("streamed", streamed)):
            fn()  # warm-up: per-device constants are made here, once
            with sync_warnings() as syncs, list_tensors() as lists:
                for _ in range(3):
                    fn()
            fig.add(f"{name}_{path}_syncs", len(syncs) if on_cuda() else None, unit, calls=3, batch=batch, size=size,
                    first=syncs[:3], text=f"{name} augmentation ({path}, batch {batch}, {size} px), 3 calls: "
                    f"{len(syncs) if on_cuda() else 'n/a (no CUDA)'} host synchronisations, {len(lists)} tensors "
                    f"built from Python lists" + (f" ({', '.join(sorted(set(lists)))})" if lists else ""))
            fig.add(f"{name}_{path}_list_tensors", len(lists), "calls", where=sorted(set(lists)), quiet=True)
    from trainers.loop import autocast

    images = pretrain_step.make_views(64 if not smoke else 16, 32, d, count=2)
    precision = "bf16" if on_cuda() else "fp32"
    for name, hard in (("mocov2_step", None), ("mocov2_hard_negatives_step", HARD)):
        model = pretrain_step.ours("tiny_resnet", 32, d, K=4096, hard=hard)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9)
        step_g = torch.Generator().manual_seed(1)

        def train_step(i: int) -> None:
            a, b = images[i % len(images)]
            with autocast(d, precision):
                loss = model(a, b, step_g)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        train_step(0)
        with sync_warnings() as syncs:
            for i in range(3):
                train_step(i + 1)
        fig.add(f"{name}_syncs", len(syncs) if on_cuda() else None, unit, steps=3, precision=precision,
                first=syncs[:3], text=f"MoCo v2 training step (tiny ResNet, {precision}"
                f"{', hard negatives' if hard else ''}), 3 steps: "
                f"{len(syncs) if on_cuda() else 'n/a (no CUDA)'} host synchronisations")


# ---------------------------------------------------------------------------------------------
# benches


def step(fig: Figures, smoke: bool, work: Path) -> None:
    """bench/pretrain_step.py: ours (bf16 + channels_last on CUDA) against Algorithm 1 in fp32 with
    TF32 off, and with TF32 on."""
    backbone, size, batch = ("tiny_resnet", 32, 16) if smoke else ("resnet50", 224, 128)
    win = pretrain_step.step_window(2, 0.2) if smoke else pretrain_step.step_window(10, 3.0, warmup=5)
    res = pretrain_step.compare(backbone, size, batch, win)
    for name, r in res.items():
        fig.add(f"{name}_images_per_second", r["rate"].per_second, "images/s", backbone=backbone, size=size,
                batch=batch, **r["flags"], **rate_context(r["rate"]))
    mine = next(k for k in res if k.startswith("ours_"))
    for ref in ("algorithm1_fp32_tf32_off", "algorithm1_tf32"):
        fig.add(f"{mine}_over_{ref}", res[mine]["rate"].per_second / res[ref]["rate"].per_second, "x")


def split_bn_cost(fig: Figures, smoke: bool, work: Path) -> None:
    """bench/split_bn.py: plain BN, split BN (ours, channels_last kept) and moco's reshape split BN."""
    backbone, size, batch = ("tiny_resnet", 32, 16) if smoke else ("resnet50", 224, 128)
    win = pretrain_step.step_window(2, 0.2) if smoke else pretrain_step.step_window(8, 2.0, warmup=4)
    res = split_bn.compare(backbone, size, batch, 8, win)
    plain = res["plain_bn"].per_second
    for name, r in res.items():
        fig.add(f"{name}_images_per_second", r.per_second, "images/s", backbone=backbone, size=size, batch=batch,
                ratio_to_plain=r.per_second / plain, **rate_context(r))


def hard_negatives(fig: Figures, smoke: bool, work: Path) -> None:
    """A MoCo v2 step at K = 65,536 (Fig. 5's queue; 4,096 with ``smoke``) with hard-negative sampling
    against the plain one."""
    backbone, size, batch, K = ("tiny_resnet", 32, 16, 4096) if smoke else ("resnet50", 224, 128, 65536)
    win = pretrain_step.step_window(2, 0.2) if smoke else pretrain_step.step_window(8, 2.0, warmup=4)
    d = dev()
    precision = "bf16" if on_cuda() else "fp32"
    views = pretrain_step.make_views(batch, size, d)
    rates = {}
    for name, hard in (("plain", None), ("hard", HARD)):
        rates[name] = pretrain_step.moco_rate(pretrain_step.ours(backbone, size, d, K=K, hard=hard), views, win,
                                              precision)  # the model is freed before the next one is built
        fig.add(f"{name}_step_images_per_second", rates[name].per_second, "images/s", K=K, backbone=backbone,
                size=size, batch=batch, precision=precision, **rate_context(rates[name]))
    fig.add("hard_over_plain_step_time", rates["plain"].per_second / rates["hard"].per_second, "x", K=K,
            note="the hard-negative step's time over the plain one's")


def data_path_part(fig: Figures, smoke: bool, work: Path) -> None:
    """bench/data_path.py: the streaming path against moco's loader, steady state. Batches of 128: a
    loader's rate per image hardly depends on the batch, and its warm-up (the prefetch depth, 15
    workers × 4 batches for ours) is half the images it would be at 256."""
    images, size, batch, w, batches, seconds = ((64, 32, 16, 2, 3, 0.3) if smoke else
                                                (1280, 224, 128, workers(), 20, 5.0))
    root = data_path.bench_tree(images)
    with shm_notes(fig):
        res = data_path.compare(root, size, batch, w, batches, seconds, dev(), torch.bfloat16)
    for name, r in res.items():
        fig.add(f"{name}_images_per_second", r.per_second, "images/s", size=size, batch=batch, workers=w,
                **rate_context(r))
    fig.add("sslgrid_over_moco_reference", res["sslgrid"].per_second / res["moco_reference"].per_second, "x")


def decode(fig: Figures, smoke: bool, work: Path) -> None:
    """Decoding in the DataLoader workers (PIL) against on the device (decode_jpeg, nvJPEG on CUDA)."""
    images, size, batch, w, batches, seconds = ((64, 32, 16, 2, 3, 0.3) if smoke else
                                                (1280, 224, 256, workers(), 20, 4.0))
    root = data_path.bench_tree(images)
    with shm_notes(fig):
        res = data_path.decode_compare(root, size, batch, w, batches, seconds, dev(), torch.bfloat16)
    for name, r in res.items():
        fig.add(f"{name}_images_per_second", r.per_second, "images/s", size=size, batch=batch, workers=w,
                **rate_context(r))
    (_, a), (_, b) = res.items()
    fig.add("device_over_workers", b.per_second / a.per_second, "x")


# ---------------------------------------------------------------------------------------------
# end to end


class TimedBatches:
    """trainers/loop.py's Batches with epoch 0's batches passed through a Meter: the loop's own
    steps, timed after their warm-up, the window closing the epoch when it is complete."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner, self.meter = inner, meter

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int, steps: list[torch.Tensor]):
        return self.meter.wrap(self.inner.epoch(epoch, steps)) if epoch == 0 else self.inner.epoch(epoch, steps)

    def close(self) -> None:
        self.inner.close()


def jpeg_spec(root: Path, size: int, backbone: str, batch: int, in_memory: bool | None, bn_splits: int,
              w: int, K: int) -> Any:
    """MoCo v2 on the JPEG tree at ``root``, one epoch, as the frozen StageConfig a stage receives."""
    from pipeline.spec import Problem, build_stage_config

    problems: list[Problem] = []
    cfg = build_stage_config({"dataset": {"name": "imagefolder", "root": str(root), "image_size": size,
                                          "in_memory": in_memory, "workers": w},
                              "backbone": {"name": backbone, "bn_splits": bn_splits},
                              "pretrain": {"epochs": 1, "batch_size": batch, "K": K, "precision": "auto"}}, problems)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    return cfg


def timed_pretrain(cfg: Any, work: Path, window: Window, data: Any) -> Rate:
    """trainers/pretrain.py's pretrain on ``data`` (an ImageSet in place of load_split's), its first
    epoch's batches timed by ``window``; returns the rate (images/s)."""
    import trainers.pretrain as P

    meter = Meter(window, size=lambda b: b[0][0].shape[0])
    real = P.image_batches

    def timed(*args: Any, **kwargs: Any) -> TimedBatches:
        return TimedBatches(real(*args, **kwargs), meter)

    with mock.patch.object(P, "load_split", lambda ds, split: data), mock.patch.object(P, "image_batches", timed):
        P.pretrain(cfg, work, ListSink())
    assert meter.rate is not None
    return meter.rate


def repeated(data: Any, times: int) -> Any:
    """An ImageSet whose images (a tensor, or a LazyImages of files) are repeated ``times``: an epoch
    long enough for a steady window without writing more files."""
    from trainers.data import ImageSet, LazyImages

    if isinstance(data.images, LazyImages):
        imgs = LazyImages(list(data.images.files) * times, data.images.image_size, native=data.images.native)
    else:
        imgs = data.images.repeat(times, 1, 1, 1)
    return ImageSet(imgs, data.labels.repeat(times), data.classes)


def e2e(fig: Figures, smoke: bool, work: Path) -> None:
    """MoCo v2 pretraining (trainers/pretrain.py, the stage's own loop) on streamed JPEGs against the
    same images decoded into memory: the same number of steady-state steps for each, timed after
    each run's own warm-up (the streamed one's covers the loader's prefetch depth). The data path
    must not hold the GPU back: the goal is >= 90%."""
    from trainers.data import load_split
    from trainers.loop import resolve_precision

    images, size, backbone, batch, w, steps, splits, K = ((64, 32, "tiny_resnet", 16, 2, 4, 2, 32) if smoke else
                                                          (1280, 224, "resnet50", 256, workers(), 30, 8, 4096))
    root = data_path.bench_tree(images)
    warm = {"in memory": 2 if smoke else 5, "streamed": loader_warmup(w, data_path.PREFETCH)}
    rates = {}
    for label, in_memory in (("in memory", True), ("streamed", None)):
        cfg = jpeg_spec(root, size, backbone, batch, in_memory, splits, w, K)
        win = Window(warmup=warm[label], min_batches=steps, min_seconds=0.0, max_batches=steps,
                     max_seconds=float("inf"))
        data = load_split(cfg.dataset, "train")
        data = repeated(data, -(-(win.batches_needed + 1) * batch // len(data)))
        with shm_notes(fig):
            rates[label] = timed_pretrain(cfg, work / f"e2e-{label.replace(' ', '-')}", win, data)
        fig.add(f"{label.replace(' ', '_')}_images_per_second", rates[label].per_second, "images/s",
                backbone=backbone, size=size, batch=batch, workers=w,
                precision=resolve_precision(cfg.pretrain.precision),
                **rate_context(rates[label]))
    fig.add("streamed_over_in_memory", rates["streamed"].per_second / rates["in memory"].per_second, "ratio",
            goal=0.9, text=f"streamed / in memory: {rates['streamed'].per_second / rates['in memory'].per_second:.0%} "
            f"over {steps} steady steps each (goal >= 90%)")


# ---------------------------------------------------------------------------------------------
# two processes on one GPU


def _rank(rank: int, port: int, spec: Any, out: str) -> None:
    from trainers import distributed as D
    from trainers.pretrain import pretrain

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK="0")
    D.init_from_env("cpu:gloo,cuda:gloo")  # two ranks on one GPU: NCCL refuses that
    sink = ListSink()
    pretrain(spec, Path(out), sink)
    if rank == 0:
        (Path(out) / "losses.json").write_text(json.dumps(sink.series("loss")))
    torch.distributed.destroy_process_group()


def two_processes(fig: Figures, smoke: bool, work: Path) -> None:
    """A 2-process data-parallel pretraining on the one device (gloo serves CUDA tensors) against 1
    process: the losses must agree to float-order noise."""
    import socket

    import torch.multiprocessing as mp

    from trainers.pretrain import pretrain

    stages = quickstart_specs(["pretrain.knn_every=0", "pretrain.epochs=1", "pretrain.K=128", "dataset.num_train=256",
                               "dataset.num_val=64"] if smoke else ["pretrain.knn_every=0", "pretrain.epochs=2"])
    spec = stages[f"{_cells(stages)[0]}:pretrain"].config
    spec = dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain, precision="fp32"))
    one = ListSink()
    pretrain(spec, work / "dp-one", one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, spec, str(work / "dp-two")), nprocs=2, join=True)
    two = json.loads((work / "dp-two" / "losses.json").read_text())
    rel = max(abs(a - b) / abs(b) for a, b in zip(two, one.series("loss")))
    fig.add("largest_relative_loss_difference", rel, "relative", losses_two=two, losses_one=one.series("loss"),
            text=f"2 processes (gloo) on one device against 1: losses {[round(x, 4) for x in two]} vs "
            f"{[round(x, 4) for x in one.series('loss')]}, largest relative difference {rel:.1e}")


PARTS: dict[str, Callable[[Figures, bool, Path], None]] = {
    "sync_count": sync_count, "step": step, "split_bn": split_bn_cost, "hard_negatives": hard_negatives,
    "data_path": data_path_part, "e2e": e2e, "decode": decode, "quickstart": quickstart,
    "two_processes": two_processes,
}

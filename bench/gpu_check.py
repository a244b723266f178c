"""Every GPU figure of the real-scale path, in one script for a machine with one GPU and no network,
Ray, MLflow or submitit: it drives trainers/ and evaluators/ directly (they import none of those),
with list-backed sinks. `make gpu-check` runs it; it prints the card's name with every figure.

1. the quickstart's pretraining (MoCo v2 + MLP) and probe recipes on CUDA, against a random init;
2. the data path (bench/data_path.py): JPEG → two augmented bf16 views, sslgrid against moco's loader;
3. the step (bench/pretrain_step.py): ResNet-50 at 224 px, bf16 + channels_last against fp32 Algorithm 1;
4. an end-to-end ResNet-50 pretraining epoch on the JPEG tree against the same run with its images in
   memory: the data path must not hold the GPU back (>= 90%);
5. a 2-process data-parallel pretraining on the one GPU (gloo serves CUDA tensors; NCCL refuses two
   ranks on one device) against 1 process.

    python bench/gpu_check.py [--smoke]     # --smoke: tiny sizes, for a CPU (tests/unit/test_gpu_check.py)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainers.sink import ListSink  # noqa: E402


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"


def say(text: str) -> None:
    print(f"[{card()}] {text}", flush=True)


def quickstart_specs(epochs: int | None) -> dict[str, dict]:
    """The quickstart's stage specs, resolved by the planner (no Ray, MLflow or tracking needed)."""
    from pipeline.grid import load_grid
    from pipeline.plan import build_plan

    over = [f"pretrain.epochs={epochs}", "pretrain.knn_every=0", "linear_probe.epochs=20", "pretrain.K=256",
            "dataset.num_train=512", "dataset.num_val=128"] if epochs else []
    if torch.cuda.is_available():  # a GPU per stage, so precision auto means bf16, as on a GPU cluster
        over += ["resources.pretrain.gpus=1", "resources.linear_probe.gpus=1"]
    plan = build_plan(load_grid(REPO / "grids" / "quickstart.yaml", over))
    stages = {}
    for cell, keys in plan.cells.items():
        for kind in ("pretrain", "linear_probe"):
            stages[f"{cell}:{kind}"] = plan.stages[keys[kind]]
    return stages


class sync_counter:
    """Collects torch's warnings for host synchronisations (CUDA only; an empty list elsewhere)."""

    def __enter__(self) -> list:
        import warnings

        self.caught: list = []
        if torch.cuda.is_available():
            self._ctx = warnings.catch_warnings(record=True)
            self._log = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self.caught

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
            self.caught.extend(w for w in self._log if "synchroniz" in str(w.message))
            self._ctx.__exit__(*exc)


def check_quickstart(work: Path, smoke: bool) -> None:
    from evaluators.linear_probe import linear_probe
    from trainers.pretrain import pretrain

    stages = quickstart_specs(1 if smoke else None)
    for cell in ("table1/head.kind=mlp", "random-init"):
        pre = stages[f"{cell}:pretrain"]
        t = time.perf_counter()
        sink = ListSink()
        with sync_counter() as syncs:
            up = pretrain(pre.config, work / pre.key, sink)
        t_pre = time.perf_counter() - t
        if syncs and cell != "random-init":
            p = pre.spec["pretrain"]
            steps = p["epochs"] * (pre.spec["dataset"]["num_train"] // p["batch_size"])
            say(f"quickstart {cell}: {len(syncs)} host synchronisations in {steps} training steps "
                f"(torch.cuda.set_sync_debug_mode; checkpoints, epoch means and the check every 50 steps included)")
        probe = stages[f"{cell}:linear_probe"]
        t = time.perf_counter()
        res = linear_probe(probe.config, up, work / probe.key, ListSink())
        ips = sink.series("images_per_second")
        say(f"quickstart {cell}: pretraining {t_pre:.1f} s ({pre.spec['pretrain']['precision']}"
            + (f", {ips[-1]:.0f} img/s in the last epoch" if ips else "") + f"), probe top-1 {res.metrics['top1']:.1f} "
            f"in {time.perf_counter() - t:.1f} s")


def run_bench(args: list[str]) -> None:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    for line in (out.stdout + out.stderr).strip().splitlines()[-4:]:
        say(f"{args[0]}: {line}")


def jpeg_spec(root: Path, size: int, backbone: str, batch: int, epochs: int, in_memory: bool | None,
              bn_splits: int, workers: int | None):
    """MoCo v2 on the JPEG tree at ``root``, as the frozen StageConfig a stage receives."""
    from pipeline.spec import Problem, build_stage_config

    problems: list[Problem] = []
    cfg = build_stage_config({"dataset": {"name": "imagefolder", "root": str(root), "image_size": size,
                                          "in_memory": in_memory, "workers": workers},
                              "backbone": {"name": backbone, "bn_splits": bn_splits},
                              "pretrain": {"epochs": epochs, "batch_size": batch, "K": min(1024, batch * 2),
                                           "precision": "auto"}}, problems)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    return cfg


def check_end_to_end(work: Path, smoke: bool) -> None:
    """Images/s of the last epoch, streamed JPEGs against the same images decoded into memory."""
    from trainers.data import ensure_jpeg_tree
    from trainers.pretrain import pretrain

    n, size, backbone, batch = (64, 32, "tiny_resnet", 16) if smoke else (2560, 224, "resnet50", 256)
    root = ensure_jpeg_tree(n, 60, size=(500, 375))  # bench/data_path.py's tree: made once
    rates = {}
    for label, in_memory in (("in memory", True), ("streamed JPEGs", None)):
        sink = ListSink()
        spec = jpeg_spec(root, size, backbone, batch, 2, in_memory, 8 if not smoke else 2, None)
        pretrain(spec, work / f"e2e-{label.replace(' ', '-')}", sink)
        rates[label] = sink.series("images_per_second")[-1]
    say(f"end-to-end MoCo v2 {backbone} at {size} px, batch {batch}, epoch 2: streamed {rates['streamed JPEGs']:.0f} "
        f"img/s, in memory {rates['in memory']:.0f} img/s: {rates['streamed JPEGs'] / rates['in memory']:.0%}")


def _rank(rank: int, port: int, spec, out: str) -> None:
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


def check_two_processes(work: Path, smoke: bool) -> None:
    import socket

    import torch.multiprocessing as mp

    from trainers.pretrain import pretrain

    stages = quickstart_specs(1 if smoke else 2)
    import dataclasses

    spec = stages["table1/head.kind=mlp:pretrain"].config
    spec = dataclasses.replace(spec, pretrain=dataclasses.replace(spec.pretrain, precision="fp32"))
    one = ListSink()
    pretrain(spec, work / "dp-one", one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, spec, str(work / "dp-two")), nprocs=2, join=True)
    two = json.loads((work / "dp-two" / "losses.json").read_text())
    rel = max(abs(a - b) / abs(b) for a, b in zip(two, one.series("loss")))
    say(f"2 processes (gloo) on one device against 1: losses {[round(x, 4) for x in two]} vs "
        f"{[round(x, 4) for x in one.series('loss')]}, largest relative difference {rel:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part runs, on a CPU")
    args = ap.parse_args()
    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("SSLGRID_CACHE", str(work / "cache"))
        check_quickstart(work, args.smoke)
        if args.smoke:
            run_bench(["bench/data_path.py", "--images", "64", "--size", "32", "--batch", "16", "--batches", "2"])
            run_bench(["bench/pretrain_step.py", "--steps", "2"])
        else:
            workers = str(min(15, os.cpu_count() or 2))
            run_bench(["bench/data_path.py", "--images", "2560", "--workers", workers, "--batch", "256",
                       "--batches", "8"])
            run_bench(["bench/pretrain_step.py", "--backbone", "resnet50", "--size", "224", "--batch", "128",
                       "--steps", "15"])
        check_end_to_end(work, args.smoke)
        check_two_processes(work, args.smoke)
    say(f"gpu check done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

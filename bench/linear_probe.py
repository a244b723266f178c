"""The `cached` probe against moco's main_lincls protocol on the same frozen backbone and data.

Prints each protocol's wall time and top-1, and the time ratio. The backbone is a pretraining
checkpoint (``--checkpoint``; by default the quickstart's MoCo v2 + MLP one if it exists, else a
random-init backbone). Both protocols run the same number of epochs with the same classifier, lr
schedule and seed.

    python bench/linear_probe.py [--epochs 30] [--checkpoint runs/quickstart/pretrain/<key>/checkpoints/final.pt]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from evaluators.linear_probe import linear_probe
from pipeline.grid import load_grid
from trainers.pretrain import pretrain
from trainers.results import PretrainResult
from trainers.sink import ListSink

REPO = Path(__file__).resolve().parents[1]


def quickstart_checkpoint() -> Path | None:
    for spec_file in sorted((REPO / "runs" / "quickstart" / "pretrain").glob("*/spec.json")):
        spec = json.loads(spec_file.read_text())["spec"]
        done = spec_file.parent / "DONE"
        if done.exists() and spec["pretrain"]["method"] == "mocov2" and spec["pretrain"]["head"]["kind"] == "mlp":
            return spec_file.parent / "checkpoints" / "final.pt"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--checkpoint", type=Path)
    args = ap.parse_args()
    cells = load_grid(REPO / "grids" / "quickstart.yaml").cells
    cfg = next(c.config for c in cells if c.config.pretrain.method == "mocov2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    ckpt = args.checkpoint or quickstart_checkpoint()
    if ckpt is None:
        random_init = next(c.config for c in cells if c.config.pretrain.method == "none")
        ckpt = Path(pretrain(random_init, tmp / "pre", ListSink()).checkpoint)
        print("backbone: random init (run `make quickstart` first to probe a MoCo v2 backbone)")
    else:
        print(f"backbone: {ckpt}")
        # a private copy, so the cached probe extracts features itself instead of reading the ones
        # the quickstart's stages left beside the checkpoint (trainers/features.py)
        ckpt = Path(shutil.copy2(ckpt, tmp / "final.pt"))
    print(f"torch threads: {torch.get_num_threads()}, device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"epochs: {args.epochs}, train images: {cfg.dataset.num_train}")
    results = {}
    for mode in ("cached", "moco"):
        probe = replace(cfg, linear_probe=replace(cfg.linear_probe, epochs=args.epochs, mode=mode))
        t0 = time.perf_counter()
        r = linear_probe(probe, PretrainResult(str(ckpt), 0, 0), tmp / mode, ListSink())  # the probe reads its checkpoint
        results[mode] = (time.perf_counter() - t0, r.metrics["top1"])
        print(f"{mode:>7}: {results[mode][0]:8.1f} s   top-1 {r.metrics['top1']:.2f}")
    (tc, ac), (tm, am) = results["cached"], results["moco"]
    print(f"speed-up cached vs moco: {tm / tc:.1f}x   |delta top-1| = {abs(ac - am):.2f} pt")


if __name__ == "__main__":
    main()

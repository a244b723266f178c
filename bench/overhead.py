"""Per-stage overhead of `sslgrid run` (scheduling, tracking, checkpoint I/O): a grid of N trivial
stages (random-init pretraining of the tiny backbone, N seeds) through the CLI, against the same
stage function called directly N times in one process.

    python bench/overhead.py [--n 50]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainers.pretrain import pretrain
from trainers.sink import ListSink

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    seeds = list(range(args.n))
    grid = tmp / "overhead.yaml"
    grid.write_text(f"name: overhead\ndefaults:\n  pretrain: {{method: none}}\naxes:\n  pretrain.seed: {seeds}\n"
                    "evaluations: []\nresources:\n  pretrain: {cpus: 1}\n")

    from pipeline.grid import load_grid
    from pipeline.plan import build_plan

    plan = build_plan(load_grid(grid))
    t0 = time.perf_counter()
    for stage in plan.ordered():
        pretrain(stage.config, tmp / "direct" / stage.key, ListSink())
    direct = time.perf_counter() - t0

    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(grid), "--workdir", str(tmp / "runs"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    through = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, check=True)
    rerun = time.perf_counter() - t0

    n = len(plan.stages)
    print(f"{n} stages, {os.cpu_count()} cores")
    print(f"direct calls      : {direct:7.2f} s  ({direct / n * 1000:.0f} ms/stage)")
    print(f"sslgrid run       : {through:7.2f} s  (includes Ray start, MLflow store creation, process start-up)")
    print(f"overhead per stage: {(through - direct) / n:7.3f} s   ratio sslgrid/direct: {through / direct:.1f}x")
    print(f"rerun (all cached): {rerun:7.2f} s")


if __name__ == "__main__":
    main()

"""Where a cell's seed variance comes from: the linear probe's own randomness or the pretraining.

For a FINISHED grid run (its grid file, ``-o`` flags, ``--study``, ``--workdir`` and
``--tracking-uri``, as given to ``sslgrid run``), every cell's replicates are found from the plan
(pipeline/plan.py ``build_plan``): one pretraining per seed, its checkpoint in
``<workdir>/pretrain/<key>/checkpoints/final.pt`` (read from the stage's result.json, as the probe
stage receives it). On each replicate's frozen features (trainers/features.py: the cache its probe
stage left beside the checkpoint, else extracted again) the ``cached`` linear probe of the cell's
``linear_probe`` section is trained P times (``--probes``, default 5), with the seeds
evaluators/linear_probe.py ``probe_seeds`` derives from the replicate's probe seed. Probe 0 is the
seed the grid ran, so its top-1 is the stage's own (printed beside it as a check). No MLflow, no Ray.

Each probe runs with as many torch threads as the grid's ``resources.linear_probe.cpus`` gave the
stage (``--threads`` overrides): at lr 30 the probe's SGD amplifies the rounding of a reduction, and
on the quickstart's features one probe gave 18.7% top-1 with 1 thread (the stage's) and 18.4% with
2. Replicates are probed in ``--jobs`` processes at once (default: the CPUs over the threads).

Per cell, with n backbones (pretraining seeds) and P probes each, y[b, j] the top-1 (percent) of
backbone b under probe seed j (a balanced one-way random-effects layout, backbone as the factor):

- ``total_var``: the variance over the n backbones of y[b, 0] (one probe each, as the grid ran it):
  the seed variance the report's intervals see;
- ``within_var``: the mean over backbones of the variance over their P probes, the probe's own
  share (MS_within; its expectation is σ²_probe);
- ``probe_share`` = within_var / total_var;
- ``between_var`` = var(backbone means) − within_var / P: the pretraining's variance component
  σ²_pretrain (the ANOVA estimator; negative when the backbones differ less than the probe noise
  alone predicts), and ``probe_share_components`` = σ²_probe / (σ²_probe + max(σ²_pretrain, 0));
- ``F`` and ``p_between``: the one-way ANOVA test that the backbones differ (scipy.stats.f);
- ``sd_repeats<N>``: the model's standard deviation of a cell's top-1 with ``linear_probe.repeats:
  N`` (sqrt(σ²_pretrain⁺ + σ²_probe / N)), for N in 1, 3 and 5.

Every variance is in squared percent points, with n − 1 (P − 1) in the denominator. Source for the
decomposition: the balanced one-way random-effects ANOVA (Searle, Casella & McCulloch, "Variance
Components", 1992, ch. 3).

    python -m bench.variance_split grids/quickstart.yaml -o repeats=2 --workdir runs/q --tracking-uri sqlite:///q.db \\
        [--probes 5] [--csv variance_split.csv]

Writes the per-cell table to ``--csv`` (default ``<workdir>/variance_split.csv``) and every probe's
top-1 beside it (``…-probes.csv``). Exit 2: bad input (a grid error, a probe not in cached mode, no
cell with two finished replicates).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

EXIT_USAGE = 2
REPEATS_SHOWN = (1, 3, 5)


def decompose(y: np.ndarray) -> dict[str, float]:
    """The one-way random-effects split of ``y`` (n backbones × P probes, top-1 in percent, n ≥ 2,
    P ≥ 2): the quantities the module docstring defines (``total_var`` from column 0). Raises
    ValueError for fewer than two backbones or probes, or a ragged or non-finite array."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"need an n x P array with n >= 2 backbones and P >= 2 probes, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("top-1 values must be finite")
    n, p = y.shape
    total = float(np.var(y[:, 0], ddof=1))
    within = float(np.mean(np.var(y, axis=1, ddof=1)))  # MS_within, E = σ²_probe
    means_var = float(np.var(y.mean(axis=1), ddof=1))  # MS_between / P, E = σ²_pretrain + σ²_probe / P
    between = means_var - within / p
    ms_between = p * means_var
    f = ms_between / within if within > 0 else float("inf")
    p_between = float(stats.f.sf(f, n - 1, n * (p - 1))) if within > 0 else 0.0
    kept = max(between, 0.0)
    out = {"backbones": n, "probes": p, "mean_top1": float(y.mean()), "total_var": total, "within_var": within,
           "probe_share": within / total if total > 0 else float("nan"),
           "between_var": between,
           "probe_share_components": within / (within + kept) if within + kept > 0 else float("nan"),
           "F": f, "p_between": p_between}
    out.update({f"sd_repeats{r}": float(np.sqrt(kept + within / r)) for r in REPEATS_SHOWN})
    return out


@dataclass(frozen=True)
class Replicate:
    """One finished pretraining of a cell and what its probe stage reported."""

    cell: str  # the base cell's name
    name: str  # the replicate's (``<cell>@seed=<s>``)
    config: object  # its StageConfig
    checkpoint: Path
    stage_top1: float | None  # the grid's linear_probe stage's top1, if that stage finished


def finished_replicates(grid_path: str, overrides: list[str], workdir: str | None, tracking_uri: str | None,
                        studies: list[str]) -> tuple[dict[str, list[Replicate]], list[str], int]:
    """Base cell → its replicates whose pretraining finished (DONE in its stage folder), the notes
    on what was left out, and the torch threads the grid's probe stages ran with (their
    ``resources.linear_probe.cpus``, at least 1). Raises pipeline.grid.GridError for a bad grid or flags."""
    from pipeline.grid import load_grid
    from pipeline.plan import build_plan
    from trainers.results import EvalResult, PretrainResult

    from pipeline import decide as D

    grid = load_grid(grid_path, overrides, workdir, tracking_uri, studies)
    state = None if grid.seeded else D.stored(grid)  # a --decide run: the seeds it gave each cell
    if state is not None:
        grid = D.grid_at(grid, state)
    plan = build_plan(grid)
    out: dict[str, list[Replicate]] = {}
    notes = []
    for base, cells in grid.replicates().items():
        for cell in cells:
            keys = plan.cells[cell.name]
            pre = plan.stages[keys["pretrain"]].directory(grid.workdir)
            if not pre.done.exists():
                notes.append(f"{cell.name}: pretraining {pre} has not finished; left out")
                continue
            result = PretrainResult.from_json(json.loads(pre.result.read_text()))
            top1 = None
            if "linear_probe" in keys:
                probe = plan.stages[keys["linear_probe"]].directory(grid.workdir)
                if probe.done.exists():
                    top1 = EvalResult.from_json(json.loads(probe.result.read_text())).metrics.get("top1")
            out.setdefault(base, []).append(Replicate(base, cell.name, cell.config, Path(result.checkpoint), top1))
    return out, notes, max(1, int(grid.resources["linear_probe"].cpus))


def probe_replicate(rep: Replicate, probes: int, scratch: Path, threads: int | None = None) -> list[float]:
    """The top-1 (percent) of ``probes`` cached linear probes on ``rep``'s frozen features, with the
    seeds ``probe_seeds(linear_probe.seed, probes)``; the first is the grid's own probe. ``threads``:
    torch's intra-op threads (default: as they are)."""
    import torch

    from evaluators.linear_probe import cached_probe, probe_seeds
    from trainers.augment import AugmentParams
    from trainers.data import load_split
    from trainers.features import frozen_features
    from trainers.loop import device, prepare, resolve_precision
    from trainers.pretrain import load_backbone
    from trainers.sink import NullSink

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = rep.config
    p = cfg.linear_probe
    precision = resolve_precision(p.precision)
    backbone = prepare(load_backbone(cfg, rep.checkpoint), device())
    train, val = load_split(cfg.dataset, "train"), load_split(cfg.dataset, "val")
    feats = {split: frozen_features(backbone, data.images, rep.checkpoint, cfg.dataset, split, AugmentParams(),
                                    precision) for split, data in (("train", train), ("val", val))}
    tops = []
    for i, seed in enumerate(probe_seeds(p.seed, probes)):
        history = cached_probe(feats["train"], train.labels, feats["val"], val.labels, len(train.classes), p, seed,
                               scratch / f"{rep.name.replace('/', '_')}-probe{i}.pt", NullSink(), precision)
        tops.append(history[-1]["val_top1"])
    return tops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="the -o flags the grid ran with")
    ap.add_argument("--study", action="append", default=[])
    ap.add_argument("--workdir")
    ap.add_argument("--tracking-uri", help="as given to sslgrid run (only so that the grid loads as it ran)")
    ap.add_argument("--probes", type=int, default=5, help="probe seeds per backbone (P, at least 2)")
    ap.add_argument("--csv", type=Path, help="the per-cell table (default <workdir>/variance_split.csv)")
    ap.add_argument("--threads", type=int, help="torch threads per probe (default: resources.linear_probe.cpus)")
    ap.add_argument("--jobs", type=int, help="replicates probed at once (default: CPUs // threads)")
    args = ap.parse_args(argv)
    from pipeline.grid import GridError

    if args.probes < 2:
        print("--probes: at least 2, or there is no within-backbone variance to measure", file=sys.stderr)
        return EXIT_USAGE
    try:
        found, notes, stage_threads = finished_replicates(args.grid, args.override, args.workdir, args.tracking_uri,
                                                          args.study)
    except GridError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    for note in notes:
        print(f"note: {note}")
    cells = {c: reps for c, reps in found.items() if len(reps) >= 2}
    for c in sorted(set(found) - set(cells)):
        print(f"note: {c}: one finished replicate; a split needs two or more (run the grid with -o repeats=N)")
    moco = sorted(c for c, reps in cells.items() if reps[0].config.linear_probe.mode != "cached")
    if moco:
        print(f"{args.grid}: linear_probe.mode is not cached in {', '.join(moco)}: this tool re-runs the cached "
              f"probe on stored features; run the grid with -o linear_probe.mode=cached", file=sys.stderr)
        return EXIT_USAGE
    if not cells:
        print(f"{args.grid}: no cell has two finished pretraining seeds under this --workdir and these -o flags",
              file=sys.stderr)
        return EXIT_USAGE
    threads = args.threads or stage_threads
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
    print(f"{sum(map(len, cells.values()))} backbones in {len(cells)} cells, {args.probes} probes each; "
          f"{threads} torch thread(s) per probe, {jobs} process(es)")
    rows, raw = [], []
    scratch = Path(tempfile.mkdtemp(prefix="variance-split-"))
    # spawn, not fork: a forked child of a process whose OpenMP pool already ran can hang
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        for cell, reps in cells.items():
            t0 = time.perf_counter()
            y = np.array(list(pool.map(probe_replicate, reps, [args.probes] * len(reps), [scratch] * len(reps),
                                       [threads] * len(reps))))  # n × P
            for rep, tops in zip(reps, y):
                raw += [{"cell": cell, "replicate": rep.name, "probe": j, "top1": t, "stage_top1": rep.stage_top1}
                        for j, t in enumerate(tops)]
            stage = [r.stage_top1 for r in reps]
            agree = all(s is not None and abs(s - t) < 1e-6 for s, t in zip(stage, y[:, 0]))
            rows.append({"cell": cell, **decompose(y), "probe0_is_stage_top1": agree,
                         "seconds": round(time.perf_counter() - t0, 1)})
    finally:
        pool.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    table = pd.DataFrame(rows)
    workdir = Path(args.workdir) if args.workdir else None
    out = args.csv or (workdir or Path(".")) / "variance_split.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    pd.DataFrame(raw).to_csv(out.with_name(out.stem + "-probes.csv"), index=False)
    shown = ["cell", "backbones", "probes", "mean_top1", "total_var", "within_var", "probe_share", "between_var",
             "probe_share_components", "p_between"] + [f"sd_repeats{r}" for r in REPEATS_SHOWN] + ["probe0_is_stage_top1"]
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.4g}".format):
        print(table[shown].to_string(index=False))
    print(f"variances in squared percent points; wrote {out} and {out.with_name(out.stem + '-probes.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seeds as replicates: every cell once per seed, seed 0 the stage a grid without seeds runs, random
inits shared per seed, the report's mean and 95% interval checked against scipy on a real store."""
from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats

from pipeline.grid import GridError, load_grid
from pipeline.plan import build_plan
from pipeline.report import baselines, cell_table, differences, numeric, replicate_values, stage_runs, write_report
from pipeline.stats import contrast, difference, estimate
from pipeline.tracking import client, prepare_runs

GRID = """
name: reps
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {epochs: 1, batch_size: 16, K: 32}
{seeds}
studies:
  table1:
    axes: {pretrain.head.kind: [mlp, none]}
    cells:
      - {name: scratch, pretrain.method: none}
cells:
  - {name: random-init, pretrain.method: none}
evaluations:
  linear_probe: all
  knn: [table1/head.kind=mlp]
"""


def _grid(tmp_path, seeds: str = "seeds: [0, 1]", overrides=()):
    (tmp_path / "g.yaml").write_text(GRID.replace("{seeds}", seeds))
    return load_grid(tmp_path / "g.yaml", list(overrides), workdir=str(tmp_path / "runs"),
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_every_cell_runs_once_per_seed_and_seed_0_is_the_old_stage(tmp_path):
    grid = _grid(tmp_path)
    plan, single = build_plan(grid), build_plan(_grid(tmp_path, seeds=""))
    reps = grid.replicates()
    assert list(reps) == ["random-init", "table1/head.kind=mlp", "table1/head.kind=none", "table1/scratch"]
    assert all([c.seed for c in r] == [0, 1] for r in reps.values())
    mlp1 = reps["table1/head.kind=mlp"][1]
    assert mlp1.name == "table1/head.kind=mlp@seed=1" and mlp1.base == "table1/head.kind=mlp"
    # every section's seed is the replicate's, the synthetic data's is not
    assert (mlp1.config.pretrain.seed, mlp1.config.linear_probe.seed, mlp1.config.knn.__class__.__name__) == (1, 1, "KnnSpec")
    assert mlp1.config.dataset.seed == 0
    # seed 0 is exactly what the grid without seeds runs: adding seeds reruns nothing finished
    assert set(single.stages) <= set(plan.stages)
    assert {k for k in plan.cells["table1/head.kind=mlp@seed=0"].values()} == set(single.cells["table1/head.kind=mlp"].values())
    # evaluations named by the base cell follow each replicate
    assert all("knn" in plan.cells[c.name] for c in reps["table1/head.kind=mlp"])
    assert not any("knn" in plan.cells[c.name] for c in reps["table1/head.kind=none"])


def test_random_inits_dedup_per_seed(tmp_path):
    plan = build_plan(_grid(tmp_path, seeds="repeats: 3"))
    random_pre = {plan.cells[c.name]["pretrain"] for r in ("random-init", "table1/scratch")
                  for c in plan.grid.replicates()[r]}
    assert len(random_pre) == 3  # two random-init cells, three seeds: one stage per seed
    for seed in range(3):
        assert plan.cells[f"random-init@seed={seed}"]["pretrain"] == plan.cells[f"table1/scratch@seed={seed}"]["pretrain"]
    # 4 cells x 3 seeds, the two random inits shared per seed (pretrain and probe)
    assert plan.naive_count == 4 * 3 * 2 + 3 and len(plan.stages) == plan.naive_count - 3 * 2


def test_a_study_sets_its_own_seeds_and_o_repeats_replaces_the_files(tmp_path):
    text = GRID.replace("{seeds}", "seeds: [0, 1]").replace("  table1:\n", "  table1:\n    seeds: [5]\n")
    (tmp_path / "g.yaml").write_text(text)
    grid = load_grid(tmp_path / "g.yaml")
    assert [c.seed for c in grid.replicates()["table1/head.kind=mlp"]] == [5]
    assert grid.replicates()["table1/head.kind=mlp"][0].name == "table1/head.kind=mlp"  # one seed: no suffix
    assert [c.seed for c in grid.replicates()["random-init"]] == [0, 1]
    over = _grid(tmp_path, overrides=["repeats=3"])
    assert [c.seed for c in over.replicates()["random-init"]] == [0, 1, 2]


@pytest.mark.parametrize("seeds, overrides, field, message", [
    ("seeds: [0, 0]", (), "seeds", "lists a seed twice"),
    ("seeds: []", (), "seeds", "a list of 1 to 1000 whole numbers from 0 to 2147483647"),
    ("seeds: [0, 2147483648]", (), "seeds", "a list of 1 to 1000 whole numbers from 0 to 2147483647"),
    ("seeds: [0.5]", (), "seeds", "a list of 1 to 1000"),
    ("seeds: 3", (), "seeds", "a list of 1 to 1000"),
    ("repeats: 0", (), "repeats", "whole number from 1 to 1000"),
    ("", ("repeats=100000000000",), "-o: repeats", "whole number from 1 to 1000"),
    ("repeats: true", (), "repeats", "whole number from 1 to 1000"),
    ("seeds: [0, 1]\nrepeats: 2", (), "seeds", "are both set"),
    ("seeds: [0, 1]", ("pretrain.seed=3",), "-o: pretrain.seed", "remove one of the two"),
    ("seeds: [0, 1]", ("linear_probe.seed=3",), "-o: linear_probe.seed", "remove one of the two"),
    ("", ("pretrain.seed=-1",), "pretrain.seed", "must be >= 0"),
])
def test_bad_seeds_are_refused_naming_the_field(tmp_path, seeds, overrides, field, message):
    with pytest.raises(GridError) as err:
        _grid(tmp_path, seeds=seeds, overrides=overrides)
    text = str(err.value)
    assert "g.yaml" in text and f"{field} = " in text and message in text, text


def test_every_place_that_sets_a_seed_is_named_and_replicate_names_cannot_collide(tmp_path):
    text = GRID.replace("{seeds}", "seeds: [0, 1]").replace(
        "pretrain: {epochs: 1, batch_size: 16, K: 32}", "pretrain: {epochs: 1, batch_size: 16, K: 32, seed: 3}")
    text = text.replace("  - {name: random-init, pretrain.method: none}",
                        "  - {name: random-init, pretrain.method: none, linear_probe.seed: 4}\n"
                        "  - {name: 'x@seed=1'}\n  - {name: y, seeds: [1]}")
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(GridError) as err:
        load_grid(tmp_path / "g.yaml")
    msg = str(err.value)
    assert "defaults.pretrain.seed = 3" in msg
    assert "cells[0] (random-init): linear_probe.seed = 4" in msg
    assert "'x@seed=1': a cell's name may not contain '@seed='" in msg
    assert "cell y: seeds = [1]: is not a cell field" in msg
    # -o gives seeds and repeats at once: refused, not "the later one wins"
    (tmp_path / "h.yaml").write_text(GRID.replace("{seeds}", ""))
    with pytest.raises(GridError, match="both given"):
        load_grid(tmp_path / "h.yaml", ["seeds=[5, 6]", "repeats=2"])
    # an evaluation that names a replicate is told to name the cell
    bad = GRID.replace("{seeds}", "seeds: [0, 1]").replace("knn: [table1/head.kind=mlp]",
                                                          "knn: [table1/head.kind=mlp@seed=1]")
    (tmp_path / "e.yaml").write_text(bad)
    with pytest.raises(GridError, match="name the cell without '@seed="):
        load_grid(tmp_path / "e.yaml")


def test_o_sets_seeds_everywhere_and_one_studys_with_its_path(tmp_path):
    text = GRID.replace("{seeds}", "seeds: [0, 1]").replace("  table1:\n", "  table1:\n    seeds: [5]\n")
    (tmp_path / "g.yaml").write_text(text)
    every = load_grid(tmp_path / "g.yaml", ["repeats=3"]).replicates()
    assert [c.seed for c in every["table1/head.kind=mlp"]] == [0, 1, 2] == [c.seed for c in every["random-init"]]
    one = load_grid(tmp_path / "g.yaml", ["studies.table1.seeds=[7, 8]"]).replicates()
    assert [c.seed for c in one["table1/head.kind=mlp"]] == [7, 8] and [c.seed for c in one["random-init"]] == [0, 1]
    with pytest.raises(GridError, match="did you mean 'table1'"):
        load_grid(tmp_path / "g.yaml", ["studies.tabel1.repeats=2"])


def _finish(plan, run_ids, key, value, name="top1"):
    c = client(plan.grid.tracking_uri)
    c.log_metric(run_ids[key], name, value)
    c.set_terminated(run_ids[key], "FINISHED")


def test_report_gives_mean_and_interval_over_seeds_as_scipy_does(tmp_path):
    plan = build_plan(_grid(tmp_path))
    _, parent, run_ids = prepare_runs(plan)
    top1 = {("table1/head.kind=mlp", 0): 41.0, ("table1/head.kind=mlp", 1): 44.5,
            ("table1/head.kind=none", 0): 39.0, ("table1/head.kind=none", 1): 40.5,
            ("random-init", 0): 20.0, ("random-init", 1): 21.0}
    for (base, seed), v in top1.items():
        name = f"{base}@seed={seed}"
        _finish(plan, run_ids, plan.cells[name]["linear_probe"], v)
        _finish(plan, run_ids, plan.cells[name]["pretrain"], 5.0 - seed, "loss")
    df = stage_runs(plan)
    values = replicate_values(plan, df)
    assert values["table1/head.kind=mlp"][("linear_probe", "top1")] == {0: 41.0, 1: 44.5}

    table = cell_table(plan, df, values).set_index("cell")
    est = table.at["table1/head.kind=mlp", "linear_probe_top1"]
    mean = (41.0 + 44.5) / 2
    low, high = stats.t.interval(0.95, 1, loc=mean, scale=stats.sem([41.0, 44.5]))  # another scipy route
    assert (est.mean, est.n) == (mean, 2)
    assert est.low == pytest.approx(low) and est.high == pytest.approx(high)
    assert table.at["table1/head.kind=mlp", "seeds"] == "0,1"
    assert table.at["table1/scratch", "linear_probe_top1"] == table.at["random-init", "linear_probe_top1"]  # shared
    assert table.at["table1/head.kind=mlp", "knn_top1"] == "pending"  # no seed finished
    assert table.at["table1/head.kind=none", "knn_top1"] == "-"  # the grid does not run it there
    csv = numeric(table.reset_index()).set_index("cell")
    assert csv.at["table1/head.kind=mlp", "linear_probe_top1_ci_high"] == pytest.approx(high)

    # differences to the study's baseline, paired by seed: mlp − none per seed is 2.0 and 4.0
    diffs = differences(plan, values).set_index("cell")
    row = diffs.loc["table1/head.kind=none"]
    d = stats.ttest_rel([39.0, 40.5], [41.0, 44.5]).confidence_interval(0.95)
    assert row["difference"].startswith("-3.00") and row["paired"] == "by seed"
    assert row["95% interval"] == f"[{d.low:.2f}, {d.high:.2f}]"
    assert row["marked"] == ""  # two seeds: the interval includes 0, so it is not marked

    text, files = write_report(plan, parent)
    assert "41.00" not in text and f"{mean:.2f} ± {(high - low) / 2:.2f}" in text
    names = {f.name for f in files}
    assert "study-table1.png" in names and "![study-table1](study-table1.png)" in text
    logged = {a.path for a in client(plan.grid.tracking_uri).list_artifacts(parent, "report")}
    assert "report/study-table1.png" in logged and "report/report.md" in logged


def test_one_seed_says_no_interval_exists(tmp_path):
    plan = build_plan(_grid(tmp_path, seeds=""))
    _, parent, run_ids = prepare_runs(plan)
    _finish(plan, run_ids, plan.cells["table1/head.kind=mlp"]["linear_probe"], 41.0)
    _finish(plan, run_ids, plan.cells["table1/head.kind=none"]["linear_probe"], 39.0)
    text, _ = write_report(plan, parent)
    assert "41.00 (n=1)" in text and "no confidence interval exists" in text
    assert "no interval (n=1)" in text  # the difference to the baseline


def test_stats_against_scipy_and_verdicts():
    a, b = {0: 41.0, 1: 44.5, 2: 42.0}, {0: 39.0, 1: 40.5, 2: 41.5}
    d = difference(a, b)
    ref = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert d.paired and d.n == 3 and (d.low, d.high) == pytest.approx((ref.low, ref.high))
    # no shared seed: Welch's t
    w = difference({0: 41.0, 1: 44.5}, {2: 39.0, 3: 40.5, 4: 41.5})
    ref = stats.ttest_ind([41.0, 44.5], [39.0, 40.5, 41.5], equal_var=False).confidence_interval(0.95)
    assert not w.paired and (w.low, w.high) == pytest.approx((ref.low, ref.high))
    assert estimate([40.0]).low is None and estimate([40.0]).text() == "40.00 (n=1)"
    assert estimate([]) is None and estimate([3.0, 3.0]).half is None
    assert estimate([3.0, 3.0]).text() == "3.00 (n=2, all equal)"
    # seeds that agree exactly (top-1 moves in steps on a small val set) settle nothing
    same_steps = difference({0: 17.0, 1: 17.5, 2: 16.0}, {0: 16.5, 1: 17.0, 2: 15.5})
    assert same_steps.low is None and not same_steps.excludes_zero()
    assert difference({0: 2.0, 1: 2.0}, {2: 1.0, 3: 1.0}).low is None  # Welch, no spread
    # float32 values that agree to the 6th digit tie too (pipeline/stats.py RELATIVE_TIE)
    assert estimate([41.20000076, 41.2]).low is None and estimate([41.21, 41.2]).low is not None
    # a contrast of four cells, paired: the per-seed values' one-sample interval
    c = contrast([(1, a), (-1, b), (-1, {0: 1.0, 1: 2.0, 2: 3.0}), (1, {0: 0.0, 1: 0.0, 2: 0.0})])
    per_seed = [a[s] - b[s] - (s + 1.0) for s in range(3)]
    ref = stats.ttest_1samp(per_seed, 0).confidence_interval(0.95)
    assert c.mean == pytest.approx(sum(per_seed) / 3) and (c.low, c.high) == pytest.approx((ref.low, ref.high))
    assert isinstance(pd.DataFrame([{"x": c}]).iloc[0]["x"], type(c))


def test_each_cell_is_compared_with_its_baseline_row():
    """The paper's tables compare a row with the baseline of its own column: table3's variants at the
    same K, table2a's supervised crops with supervised 20%/100%, fig4's hard negatives with plain MoCo v2
    at the same K; a study's first cell has none."""
    from pathlib import Path

    grid = load_grid(Path(__file__).resolve().parents[2] / "grids" / "paper-mini.yaml", ["repeats=2"])
    base = baselines(build_plan(grid))
    assert base["table3/no-mlp-K1024"] == "table3/K=1024" and base["table3/m0.5-K64"] == "table3/K=64"
    assert base["table3/K=1024"] == "table3/K=64" and "table3/K=64" not in base
    crop = "table2a/method={},augment.crop_scale=[{}]"
    assert base[crop.format("supervised", "0.02, 0.1")] == crop.format("supervised", "0.2, 1.0")
    assert base[crop.format("supervised", "0.2, 1.0")] == crop.format("mocov2", "0.2, 1.0")
    assert base["fig4/hard-K64"] == "fig4/method=mocov2,K=64"
    assert base["table1/head.kind=narrow"] == "table1/head.kind=mlp"


def test_a_later_report_drops_an_earlier_ones_plots_and_claim_verdicts(tmp_path):
    plan = build_plan(_grid(tmp_path, seeds=""))
    _, parent, run_ids = prepare_runs(plan)
    _finish(plan, run_ids, plan.cells["table1/head.kind=mlp"]["linear_probe"], 41.0)
    _finish(plan, run_ids, plan.cells["table1/head.kind=none"]["linear_probe"], 39.0)
    _, files = write_report(plan, parent)
    out = plan.grid.workdir / "report"
    assert (out / "study-table1.png").exists() and (out / "claims.csv").exists()
    c = client(plan.grid.tracking_uri)
    assert "sslgrid.claim.table1.mlp-beats-none" in c.get_run(parent).data.tags
    # the same runs, the study renamed: no table1 study, so no table1 claims, plot or table
    (tmp_path / "g.yaml").write_text((tmp_path / "g.yaml").read_text().replace("table1", "heads"))
    renamed = build_plan(load_grid(tmp_path / "g.yaml", workdir=str(tmp_path / "runs"),
                                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    (out / "notes.txt").write_text("mine")  # not the report's: kept
    text, _ = write_report(renamed, parent)
    assert "## Claims" not in text and (out / "study-heads.png").exists()
    assert not (out / "study-table1.png").exists() and not (out / "claims.csv").exists()
    assert (out / "notes.txt").exists()
    assert not any(k.startswith("sslgrid.claim.") for k in c.get_run(parent).data.tags)

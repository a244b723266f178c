"""The paper's tables from a real MLflow store: rows and columns found from the cells' configs,
pending cells shown as pending, the paper's numbers beside ours, and the Fig. 4 plot."""
from __future__ import annotations

import pandas as pd
from PIL import Image

from pipeline.grid import load_grid
from pipeline.paper_tables import paper_tables
from pipeline.plan import build_plan
from pipeline.report import stage_runs
from pipeline.tracking import client, prepare_runs

GRID = """
name: papertables
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {epochs: 1, batch_size: 16, K: 32}
studies:
  table1:
    axes: {pretrain.head.kind: [mlp, none, frozen, deep, narrow]}
  table3:
    axes: {pretrain.K: [16, 64]}
    cells:
      - {name: no-mlp-16, pretrain.K: 16, pretrain.head.kind: linear}
      - {name: m05-64, pretrain.K: 64, pretrain.m: 0.5}
  fig4:
    axes: {pretrain.method: [mocov1, mocov2], pretrain.K: [16, 32]}
    cells:
      - {name: simclr-B16, pretrain.method: simclr, pretrain.batch_size: 16}
"""


def test_tables_from_a_real_store(tmp_path):
    (tmp_path / "g.yaml").write_text(GRID)
    plan = build_plan(load_grid(tmp_path / "g.yaml", workdir=str(tmp_path / "runs"),
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    _, _, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    # every probe stage finished with its own top1, except the deep head's; cells that share a
    # stage (table1's mlp cell is fig4's mocov2 K=32 cell) share its value
    by_key: dict[str, float] = {}
    for cell in plan.grid.cells:
        key = plan.cells[cell.name]["linear_probe"]
        if cell.name == "table1/head.kind=deep" or key in by_key:
            continue
        by_key[key] = float(len(by_key) + 1)
        c.log_metric(run_ids[key], "top1", by_key[key])
        c.set_terminated(run_ids[key], "FINISHED")
    finished = {cell.name: by_key.get(plan.cells[cell.name]["linear_probe"]) for cell in plan.grid.cells}
    out = tmp_path / "report"
    out.mkdir()
    text, files = paper_tables(plan, stage_runs(plan), out, compare=True)

    t1 = pd.read_csv(out / "table1.csv")
    assert list(t1.columns) == ["Method", "Top-1 (ours)", "Top-1 (ours) ci_low", "Top-1 (ours) ci_high",
                                "Top-1 (ours) n", "Top-1 (paper)"] and len(t1) == 5
    assert t1["Top-1 (ours) ci_low"].isna().all() and set(t1["Top-1 (ours) n"]) == {0, 1}  # one seed: no interval
    ours = dict(zip(t1["Method"], t1["Top-1 (ours)"]))
    assert float(ours["MoCov2"]) == finished["table1/head.kind=mlp"]
    assert float(ours["(a) without projection head"]) == finished["table1/head.kind=none"]
    assert ours["(c) with more hidden layers in projection head"] == "pending"  # not missing
    assert list(t1["Top-1 (paper)"]) == [64.4, 59.2, 62.9, 63.9, 62.2]

    t3 = pd.read_csv(out / "table3.csv")
    assert [c for c in t3.columns if " ci_" not in c and not c.endswith(" n")] == [
        "Method", "K=16", "K=64", "paper K=512", "paper K=65536"] and len(t3) == 5
    row = t3.set_index("Method")
    assert float(row.at["MoCov2", "K=16"]) == finished["table3/K=16"]
    assert float(row.at["(a) without MLP projection head", "K=16"]) == finished["table3/no-mlp-16"]
    assert row.at["(a) without MLP projection head", "K=64"] == "-"  # the grid has no such cell
    assert float(row.at["(d) with smaller momentum (0.5) in momentum encoder", "K=64"]) == finished["table3/m05-64"]

    f4 = pd.read_csv(out / "fig4.csv")
    assert set(f4["method"]) == {"MoCo", "MoCo v2", "SimCLR"}
    assert int(f4[f4["method"] == "SimCLR"]["K"].iloc[0]) == 30  # 2B - 2
    with Image.open(out / "fig4.png") as im:
        assert im.size == (600, 400)
    assert "Table 2a" not in text  # the grid has no table2a study
    assert "### Table 1" in text and "### Table 3" in text and "### Fig. 4" in text


def test_fig4_draws_a_95_percent_band_where_points_have_several_seeds(tmp_path):
    from pipeline.paper_tables import plot_fig4
    from pipeline.stats import estimate

    df = pd.DataFrame([{"method": "MoCo v2", "K": 32, "top1": estimate([40.0, 42.0, 41.0])},
                       {"method": "MoCo v2", "K": 64, "top1": estimate([41.0, 41.5, 43.0])},
                       {"method": "MoCo", "K": 32, "top1": estimate([30.0])},  # one seed: no band
                       {"method": "MoCo", "K": 64, "top1": "pending"}])
    assert plot_fig4(df, tmp_path / "fig4.png") == 1
    with Image.open(tmp_path / "fig4.png") as im:
        assert im.size == (600, 400)

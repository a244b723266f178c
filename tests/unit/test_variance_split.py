"""bench/variance_split.py's arithmetic: the one-way random-effects split of a cell's top-1 into the
probe's own variance and the pretraining's, against hand-computed values and scipy's ANOVA."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bench.variance_split import decompose


def test_decomposition_of_a_hand_made_cell():
    # 3 backbones × 3 probe seeds. Column 0 (the grid's probes): 70, 80, 60 → mean 70, variance
    # (0 + 100 + 100) / 2 = 100. Rows' variances: 4, 0, 1 → within 5/3. Row means 72, 80, 61 → mean
    # 71, variance (1 + 81 + 100) / 2 = 91; between = 91 − (5/3) / 3 = 90.444…
    y = np.array([[70.0, 72.0, 74.0], [80.0, 80.0, 80.0], [60.0, 61.0, 62.0]])
    d = decompose(y)
    assert (d["backbones"], d["probes"]) == (3, 3)
    assert d["total_var"] == pytest.approx(100.0)
    assert d["within_var"] == pytest.approx(5 / 3)
    assert d["probe_share"] == pytest.approx((5 / 3) / 100)
    assert d["between_var"] == pytest.approx(91 - 5 / 9)
    assert d["probe_share_components"] == pytest.approx((5 / 3) / (5 / 3 + 91 - 5 / 9))
    assert d["sd_repeats1"] == pytest.approx(np.sqrt(91 - 5 / 9 + 5 / 3))
    assert d["sd_repeats3"] == pytest.approx(np.sqrt(91 - 5 / 9 + 5 / 9))
    # the same layout through scipy's one-way ANOVA: F = MS_between / MS_within = 3·91 / (5/3)
    f, p = stats.f_oneway(*y)
    assert d["F"] == pytest.approx(f) == pytest.approx(273 / (5 / 3))
    assert d["p_between"] == pytest.approx(p)


def test_probe_noise_alone_gives_a_negative_pretraining_component_and_a_share_of_one():
    # the backbones' means agree (2 and 2) while each probe pair differs: all variance is the probe's
    y = np.array([[1.0, 3.0], [3.0, 1.0]])
    d = decompose(y)
    assert d["within_var"] == pytest.approx(2.0) and d["total_var"] == pytest.approx(2.0)
    assert d["between_var"] == pytest.approx(0.0 - 2.0 / 2)  # the ANOVA estimator, not clipped
    assert d["probe_share"] == pytest.approx(1.0) and d["probe_share_components"] == pytest.approx(1.0)
    assert d["sd_repeats5"] == pytest.approx(np.sqrt(2.0 / 5))  # the clipped component adds nothing


def test_the_estimators_are_unbiased_on_simulated_cells():
    """σ²_pretrain 4 and σ²_probe 1: over 4,000 simulated cells of 5 backbones × 4 probes the mean
    estimates land within 3 standard errors of the truth (a biased divisor, P or n, would not)."""
    rng = np.random.default_rng(0)
    cells = rng.normal(0, 2, size=(4000, 5, 1)) + rng.normal(0, 1, size=(4000, 5, 4))
    est = np.array([[decompose(y)[k] for k in ("within_var", "between_var", "total_var")] for y in cells])
    mean, se = est.mean(axis=0), est.std(axis=0, ddof=1) / np.sqrt(len(est))
    assert np.all(np.abs(mean - np.array([1.0, 4.0, 5.0])) < 3 * se), (mean, se)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (4,)])
def test_too_few_backbones_or_probes_is_refused(shape):
    with pytest.raises(ValueError, match="n >= 2 backbones and P >= 2 probes"):
        decompose(np.zeros(shape))


GRID = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48, image_size: 32}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: none}
  linear_probe: {epochs: 3, batch_size: 8, lr: 3.0}
seeds: [0, 1]
evaluations: [linear_probe]
"""


def test_on_a_finished_grid_probe_0_is_the_stages_own_and_the_table_is_its_split(tmp_path, monkeypatch):
    """A finished grid of two random-init seeds (run in-process): the tool finds both checkpoints,
    its first probe of each reproduces the grid's stage top-1, and the table is ``decompose`` of the
    probes it wrote. Without a second seed it refuses with exit 2."""
    import io

    import pandas as pd
    import torch
    from rich.console import Console

    from bench.variance_split import main
    from cluster.inprocess import InProcessBackend
    from pipeline.execute import execute
    from pipeline.grid import load_grid
    from pipeline.plan import build_plan
    from pipeline.tracking import prepare_runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLGRID_CPUS", "1")
    (tmp_path / "grid.yaml").write_text(GRID)
    where = ["--workdir", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    plan = build_plan(load_grid(tmp_path / "grid.yaml", workdir=where[1], tracking_uri=where[3]))
    outcomes = execute(plan, prepare_runs(plan)[2], lambda: InProcessBackend(), Console(file=io.StringIO()))
    assert {o.state for o in outcomes.values()} == {"done"}
    out = tmp_path / "vs.csv"
    # the stages ran in this process, with its torch threads: the probes must use as many to agree
    threads = ["--threads", str(torch.get_num_threads()), "--jobs", "1"]
    assert main([str(tmp_path / "grid.yaml"), *where, "--probes", "3", "--csv", str(out), *threads]) == 0
    [row] = pd.read_csv(out).to_dict("records")
    assert (row["cell"], row["backbones"], row["probes"]) == ("default", 2, 3) and row["probe0_is_stage_top1"]
    raw = pd.read_csv(tmp_path / "vs-probes.csv")
    y = raw.pivot(index="replicate", columns="probe", values="top1").to_numpy()
    assert y.shape == (2, 3)
    for key, value in decompose(y).items():
        assert row[key] == pytest.approx(value, nan_ok=True), key
    assert main([str(tmp_path / "grid.yaml"), *where, "-o", "seeds=[0]", "--csv", str(out)]) == 2

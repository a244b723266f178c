"""The paper's claims against real grids' cells (grids/paper-mini.yaml, grids/quickstart.yaml, grids/paper.yaml)
and made-up per-seed values: cells picked by config and K by rank, each verdict, the contrast against
scipy by hand, claims not tested with their reason, and the report's section, CSV and tags."""
from __future__ import annotations

import csv
import dataclasses
import re

import pytest
from scipy import stats as sps

from tests.conftest import REPO
from pipeline.claims import CLAIMS, DET_AP, NOT_TESTED, TOP1, check, section
from pipeline.grid import load_grid

MINI = REPO / "grids/paper-mini.yaml"
SEEDS = (0, 1, 2)
MLP, NONE = "table1/head.kind=mlp", "table1/head.kind=none"


@pytest.fixture(scope="module")
def mini():
    return load_grid(MINI)


def per_seed(*vals: float) -> dict[int, float]:
    return dict(zip(SEEDS, vals))


def top1(**heads: tuple[float, ...]) -> dict:
    """The report's values for table1's cells, by head kind: base name → {(kind, metric): {seed: top-1}}."""
    return {f"table1/head.kind={k}": {TOP1: per_seed(*v)} for k, v in heads.items()}


def result(grid, values, claim_id):
    return next((r for r in check(grid, values) if r.claim.id == claim_id), None)


def test_claims_are_data_with_sources():
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", i) for i in ids)  # MLflow's tag-key alphabet
    assert {c.study for c in CLAIMS} <= {c.study for c in load_grid(REPO / "grids/paper.yaml").cells}
    paper = {c.id: c.paper for c in CLAIMS}
    assert paper["table1.mlp-beats-none"] == pytest.approx(64.4 - 59.2)
    assert paper["table2a.small-crop-hurts-supervised-more"] == pytest.approx(23.5 - 17.3)
    assert paper["table3.no-mlp-hurts-more-at-small-K"] == pytest.approx(5.6 - 3.9)
    assert paper["table3.m0.5-hurts-more-at-small-K"] == pytest.approx(7.5 - 3.0)
    assert all(c.source and c.text for c in CLAIMS)
    same = [c for c in CLAIMS if c.margin is not None]
    assert {c.id for c in same} == {"fig4.mocov2-flat-in-K", "fig4.mocov2-detection-flat-in-K"}
    assert all("sslgrid's choice" in c.source for c in same)


@pytest.mark.parametrize("grid, small, second, large", [("paper-mini.yaml", 32, 64, 1024), ("paper.yaml", 256, 512, 65536)])
def test_cells_are_picked_by_config_and_K_by_rank(grid, small, second, large):
    picked = {r.claim.id: r.cells for r in check(load_grid(REPO / "grids" / grid), {})}
    assert picked["fig4.mocov2-flat-in-K"] == (f"fig4/method=mocov2,K={second}", f"fig4/method=mocov2,K={large}")
    assert picked["fig4.instdisc-drops-with-fewer-K"] == (f"fig4/method=instdisc,K={large}",
                                                          f"fig4/method=instdisc,K={small}")
    t3 = (second, large)  # Table 3's K = 512 and 65536
    assert picked["table3.m0.5-hurts-more-at-small-K"] == (f"table3/K={t3[0]}", f"table3/m0.5-K{t3[0]}",
                                                           f"table3/K={t3[1]}", f"table3/m0.5-K{t3[1]}")
    assert picked["table3.no-mlp-hurts-at-small-K"] == (f"table3/K={t3[0]}", f"table3/no-mlp-K{t3[0]}")


def test_verdicts(mini):
    values = top1(mlp=(40.0, 41.0, 40.5), none=(44.0, 45.5, 44.2),  # no head beats MLP in every seed
                  frozen=(45.0, 43.0, 44.8),                          # frozen - none: +1.0, -2.5, +0.6
                  narrow=(50.0, 51.0, 50.3))                          # clearly above none
    assert result(mini, values, "table1.mlp-beats-none").verdict == "reversed"
    r = result(mini, values, "table1.frozen-beats-none")
    assert r.verdict == "inconclusive" and r.estimate.low < 0 < r.estimate.high and r.n == 3
    assert result(mini, values, "table1.narrow-beats-none").verdict == "holds"
    assert result(mini, values, "table1.mlp-beats-narrow").verdict == "reversed"


def test_one_seed_is_inconclusive_without_an_interval(mini, tmp_path):
    values = {MLP: {TOP1: {0: 60.0}}, NONE: {TOP1: {0: 50.0}}}
    r = result(mini, values, "table1.mlp-beats-none")
    assert r.verdict == "inconclusive" and r.n == 1 and r.estimate.mean == 10.0
    assert "no interval" in r.summary()
    _, text, _, _, _ = section(mini, values, tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| table1.mlp-beats-none"))
    assert "no interval (n=1)" in row and "**inconclusive**" in row


def test_same_claim_is_same_within_the_margin_and_differs_outside(mini):
    k64, k1024 = "fig4/method=mocov2,K=64", "fig4/method=mocov2,K=1024"
    flat = {k64: {TOP1: per_seed(40.1, 39.9, 40.05)}, k1024: {TOP1: per_seed(40.0, 40.0, 40.0)}}
    claim = next(c for c in CLAIMS if c.id == "fig4.mocov2-flat-in-K")
    r = check(mini, flat, (claim,))[0]  # a family of one: TOST at 0.05
    assert r.verdict == "same"
    d = [0.1, -0.1, 0.05]
    tost = max(sps.ttest_1samp(d, -1.0, alternative="greater").pvalue, sps.ttest_1samp(d, 1.0, alternative="less").pvalue)
    assert r.p == pytest.approx(tost)
    gap = {k64: {TOP1: per_seed(35.0, 34.8, 35.1)}, k1024: {TOP1: per_seed(40.0, 40.0, 40.0)}}
    r = check(mini, gap, (claim,))[0]
    assert r.verdict == "differs" and r.estimate.mean == pytest.approx(-5.03, abs=0.01)
    det = {k64: {DET_AP: per_seed(13.0, 13.4, 12.9)}, k1024: {DET_AP: per_seed(13.1, 13.2, 13.0)}}
    det_claim = next(c for c in CLAIMS if c.id == "fig4.mocov2-detection-flat-in-K")
    assert check(mini, det, (det_claim,))[0].verdict == "same"


def test_interaction_contrast_is_scipys_one_sample_t_on_per_seed_contrasts(mini):
    cell = "table2a/method={},augment.crop_scale=[{}]".format
    sup_big, sup_small = (58.0, 57.1, 59.3), (40.2, 42.5, 41.0)
    moco_big, moco_small = (45.0, 46.2, 44.1), (33.0, 32.4, 34.8)
    values = {cell("supervised", "0.2, 1.0"): {TOP1: per_seed(*sup_big)},
              cell("supervised", "0.02, 0.1"): {TOP1: per_seed(*sup_small)},
              cell("mocov2", "0.2, 1.0"): {TOP1: per_seed(*moco_big)},
              cell("mocov2", "0.02, 0.1"): {TOP1: per_seed(*moco_small)}}
    by_hand = [(sb - ss) - (mb - ms) for sb, ss, mb, ms in zip(sup_big, sup_small, moco_big, moco_small)]
    r = result(mini, values, "table2a.small-crop-hurts-supervised-more")
    # paper-mini can test all 15 claims, so they are corrected together (Holm): the only claim with
    # values has the smallest p and faces alpha / 15, and its interval is scipy's at that level
    assert r.level == pytest.approx(0.05 / len(CLAIMS))
    ci = sps.ttest_1samp(by_hand, 0.0).confidence_interval(1 - 0.05 / len(CLAIMS))
    assert r.estimate.mean == pytest.approx(sum(by_hand) / 3)
    assert (r.estimate.low, r.estimate.high) == pytest.approx((ci.low, ci.high))
    assert r.n == 3 and r.estimate.paired


def test_missing_value_or_cell_is_not_tested_with_its_reason(mini):
    values = top1(mlp=(40.0, 41.0, 40.5))
    r = result(mini, values, "table1.mlp-beats-none")
    assert r.verdict == NOT_TESTED and r.estimate is None
    assert r.reason == f"{NONE}: no linear_probe top1 yet"
    assert r.summary() == f"not tested: {r.reason}"
    no_m05 = dataclasses.replace(mini, cells=tuple(c for c in mini.cells if "m0.5" not in c.name))
    r = result(no_m05, {}, "table3.m0.5-hurts-at-small-K")
    assert r.verdict == NOT_TESTED and "table3 has no cell MoCo v2 with m 0.5, smallest K" in r.reason
    one_k = dataclasses.replace(mini, cells=tuple(c for c in mini.cells if "1024" not in c.name))
    r = result(one_k, {}, "table3.no-mlp-hurts-more-at-small-K")
    assert r.verdict == NOT_TESTED and "needs more K values" in r.reason
    no_det = dataclasses.replace(mini, evaluations=tuple(k for k in mini.evaluations if k != "detection"))
    r = result(no_det, {}, "fig4.mocov2-detection-flat-in-K")
    assert r.verdict == NOT_TESTED and "the grid runs no detection on it" in r.reason


def test_a_study_the_grid_lacks_leaves_its_claims_out():
    only = load_grid(MINI, only_studies=["table1", "fig4"])
    assert {r.claim.study for r in check(only, {})} == {"table1", "fig4"}
    assert section(load_grid(MINI, only_studies=["baseline"]), {}, REPO / "unused") == ("", "", [], {}, [])


def test_replicates_are_grouped_by_base_name(mini):
    """Cells with a replicate suffix (``<base>@seed=<s>``) count once, under their base name."""
    grid = load_grid(REPO / "grids/paper-mini.yaml", [f"seeds={list(SEEDS)}"], only_studies=["table1"])
    assert {c.name for c in grid.cells} >= {f"{MLP}@seed={s}" for s in SEEDS}
    r = result(grid, top1(mlp=(45.0, 46.0, 45.5), none=(40.0, 40.1, 40.7)), "table1.mlp-beats-none")
    assert r.cells == (MLP, NONE) and r.verdict == "holds"


def test_quickstart_tests_only_the_table1_claims_its_cells_allow():
    """Its table1 has the MLP and no-head cells: mlp-beats-none is tested; the frozen and narrow
    claims are listed as not tested (the study is there, the cells are not), so the report says
    which of the paper's Table 1 claims this grid cannot test."""
    grid = load_grid(REPO / "grids/quickstart.yaml")
    results = {r.claim.id: r for r in check(grid, top1(mlp=(41.2, 41.9, 40.8), none=(40.2, 40.0, 39.1)))}
    assert set(results) == {c.id for c in CLAIMS if c.study == "table1"}
    assert results["table1.mlp-beats-none"].verdict == "holds"
    for cid, missing in [("table1.frozen-beats-none", "frozen"), ("table1.mlp-beats-narrow", "narrow"),
                         ("table1.narrow-beats-none", "narrow")]:
        assert results[cid].verdict == NOT_TESTED
        assert results[cid].reason == f"table1 has no cell MoCo v2, head {missing}"


def test_section_writes_the_csv_and_tags(mini, tmp_path):
    values = top1(mlp=(45.0, 45.1, 45.0), none=(40.0, 40.1, 40.05))
    head, text, files, tags, _ = section(mini, values, tmp_path)
    assert head.startswith("Statistics: 1 of 15 claims tested, Holm across the 15 claims")
    assert "holds         table1.mlp-beats-none  n=3  +4.98" in head
    assert text.startswith("## Claims") and "the rounding variance h²/12 is added to the seeds' variance" in text
    assert files == [tmp_path / "claims.csv"]
    rows = {row["id"]: row for row in csv.DictReader(files[0].open())}
    assert set(rows) == {c.id for c in CLAIMS}  # paper-mini has every study
    row = rows["table1.mlp-beats-none"]
    d = [45.0 - 40.0, 45.1 - 40.1, 45.0 - 40.05]
    ci = sps.ttest_1samp(d, 0.0).confidence_interval(1 - 0.05 / 15)  # Holm: the first of 15 claims
    assert float(row["mean"]) == pytest.approx(sum(d) / 3, abs=1e-4)
    assert (float(row["low"]), float(row["high"])) == pytest.approx((ci.low, ci.high), abs=1e-4)
    assert int(row["n"]) == 3 and row["verdict"] == "holds"
    assert rows["table1.frozen-beats-none"]["mean"] == "" and rows["table1.frozen-beats-none"]["verdict"] == NOT_TESTED
    assert tags["sslgrid.claim.table1.mlp-beats-none"] == f"holds: {sum(d) / 3:.2f} [{ci.low:.2f}, {ci.high:.2f}] n=3"
    assert tags["sslgrid.claim.table1.frozen-beats-none"].startswith("not tested: ")
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", k) for k in tags)
    assert "| table1.mlp-beats-none" in text and "**holds**" in text

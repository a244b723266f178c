"""grids/paper.yaml plans cleanly, shares the MoCo v2 baseline across studies, and is costed."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cost import MS_PER_IMAGE_EPOCH_MOCO_R50
from pipeline.stages import gpu_hours
from pipeline.grid import load_grid
from pipeline.plan import build_plan

PAPER = Path(__file__).resolve().parents[2] / "grids" / "paper.yaml"


def test_paper_grid_plans_and_dedups_the_baseline():
    plan = build_plan(load_grid(PAPER))
    studies = {c.study for c in plan.grid.cells}
    assert studies == {"table1", "table2a", "table2b", "fig4", "table3"}
    assert (plan.naive_count, len(plan.stages)) == (121, 109)
    followed = {kind: sorted(c for c, keys in plan.cells.items() if kind in keys)
                for kind in ("detection", "inversion", "tsne")}
    assert followed == {"detection": ["fig4/method=mocov2,K=512", "fig4/method=mocov2,K=65536"],
                        "inversion": ["table1/head.kind=mlp", "table1/head.kind=none"],
                        "tsne": ["table2a/method=supervised,augment.crop_scale=[0.2, 1.0]"]}
    baseline = plan.cells["table1/head.kind=mlp"]["pretrain"]
    sharing = [name for name, keys in plan.cells.items() if keys["pretrain"] == baseline]
    assert sharing == ["table1/head.kind=mlp", "table2a/method=mocov2,augment.crop_scale=[0.2, 1.0]",
                       "table2b/method=mocov2,augment.color_strength=0.5", "fig4/method=mocov2,K=65536",
                       "table3/K=65536"]
    hard = plan.stages[plan.cells["fig4/hard-K512"]["pretrain"]].spec["pretrain"]["negatives"]
    assert hard["sampling"] == "hard"


def test_cost_model_reproduces_its_anchor():
    plan = build_plan(load_grid(PAPER, only_studies=["table1"]))
    baseline = plan.stages[plan.cells["table1/head.kind=mlp"]["pretrain"]]
    assert gpu_hours(baseline.kind, baseline.config) == pytest.approx(424, rel=1e-6)  # moco README: 53 h on 8 V100
    assert MS_PER_IMAGE_EPOCH_MOCO_R50 == pytest.approx(5.957, abs=1e-3)


def test_detection_estimate_reproduces_its_anchor():
    plan = build_plan(load_grid(PAPER, only_studies=["fig4"]))
    det = plan.stages[plan.cells["fig4/method=mocov2,K=512"]["detection"]]
    d = det.spec["detection"]
    assert (d["iterations"], d["batch_size"], max(d["min_size"]), det.spec["backbone"]["name"]) == (24000, 16, 800, "resnet50")
    # detectron2 MODEL_ZOO: R50-C4 0.551 s/iter on 8 V100 at batch 16 -> 24k iterations
    assert gpu_hours(det.kind, det.config) == pytest.approx(0.551 * 8 * 24000 / 3600, rel=1e-6)


def test_paper_grid_trains_every_pretraining_on_8_processes():
    """`sslgrid plan grids/paper.yaml`: each pretraining (and probe) runs 8 processes of 1 GPU, in bf16."""
    from pipeline.plan import describe

    plan = build_plan(load_grid(PAPER))
    rows = describe(plan)
    pretrain = [r for r in rows if r["stage"] == "pretrain"]
    assert len(pretrain) == 52 and {r["procs x GPUs"] for r in pretrain} == {"8 x 1"}
    assert {r["procs x GPUs"] for r in rows if r["stage"] == "linear_probe"} == {"8 x 1"}
    assert all(r["what"].endswith(" bf16") for r in pretrain)
    assert float(pretrain[0]["wall-h"]) == pytest.approx(float(pretrain[0]["GPU-h"]) / 8, rel=1e-2)
    assert all(s.spec["backbone"]["bn_splits"] == 8 for s in plan.ordered() if s.kind == "pretrain")


def test_processes_must_divide_the_batch_and_the_bn_groups(tmp_path):
    from pipeline.grid import GridError

    g = tmp_path / "g.yaml"
    g.write_text("name: g\ndefaults:\n  backbone: {bn_splits: 4}\n  pretrain: {batch_size: 12}\n"
                 "resources:\n  pretrain: {gpus: 8}\n")
    with pytest.raises(GridError) as info:
        load_grid(g)
    text = str(info.value)
    assert "pretrain.batch_size = 12: must be a multiple of the 8 processes resources.pretrain runs" in text
    assert "backbone.bn_splits = 4: must be 1 (BN synchronised over the processes) or a multiple of the 8" in text
    assert str(g) in text


def test_gpus_must_split_evenly_among_processes(tmp_path):
    from pipeline.grid import GridError

    g = tmp_path / "g.yaml"
    g.write_text("name: g\nresources:\n  pretrain: {gpus: 8, processes: 3}\n")
    with pytest.raises(GridError, match=r"resources.pretrain.gpus = 8: cannot be shared by the 3 processes"):
        load_grid(g)
    g.write_text("name: g\ndefaults: {pretrain: {batch_size: 64, K: 512}, backbone: {bn_splits: 4}}\n"
                 "resources:\n  pretrain: {gpus: 1, processes: 2}\n")  # two ranks on one GPU: NCCL refuses them
    with pytest.raises(GridError, match=r"resources.pretrain.processes = 2: more processes than the stage's 1 GPU;"):
        load_grid(g)
    g.write_text("name: g\ndefaults: {pretrain: {batch_size: 64, K: 512}, backbone: {bn_splits: 4}}\n"
                 "resources:\n  pretrain: {gpus: 4, processes: 2}\n")
    assert load_grid(g).resources["pretrain"].per_process(4.0) == (2, 0.5, 2.0)

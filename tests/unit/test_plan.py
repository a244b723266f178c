"""Stage identity: stable, blind to fields that cannot change results, deduplicating."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from pipeline.grid import load_grid
from pipeline.plan import build_plan, identity_key
from pipeline.spec import StageConfig, to_dict


def plan_of(tmp_path, text):
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent(text))
    return build_plan(load_grid(p))


GRID = """
name: g
defaults:
  dataset: {num_train: 200, num_val: 50}
  pretrain: {epochs: 1, batch_size: 16, K: 64}
"""


def test_identity_is_stable_across_processes():
    # A golden value: if this changes, old work directories no longer map to their specs.
    # Change it only with a SCHEMA_VERSION bump.
    assert identity_key("pretrain", {"a": 1, "b": [1, 2]}, ()) == "df050509cd19"
    assert identity_key("pretrain", {"b": [1, 2], "a": 1}, ()) == "df050509cd19"  # key order is irrelevant


def test_non_identity_fields_are_excluded(tmp_path):
    a = plan_of(tmp_path, GRID)
    b = plan_of(tmp_path, GRID.replace("num_val: 50}", "num_val: 50, download: true}"))
    assert list(a.stages) == list(b.stages)
    assert "download" not in to_dict(StageConfig().dataset, identity_only=True)


def test_every_result_field_changes_identity(tmp_path):
    a = plan_of(tmp_path, GRID)
    b = plan_of(tmp_path, GRID.replace("K: 64", "K: 65"))
    pre_a = [s for s in a.ordered() if s.kind == "pretrain"][0]
    pre_b = [s for s in b.ordered() if s.kind == "pretrain"][0]
    assert pre_a.key != pre_b.key
    probe_b = [s for s in b.ordered() if s.kind == "linear_probe"][0]
    assert probe_b.upstream == (pre_b.key,)  # upstream identity flows into the dependent's key
    assert probe_b.key != [s for s in a.ordered() if s.kind == "linear_probe"][0].key


def test_shared_stages_run_once(tmp_path):
    plan = plan_of(tmp_path, GRID + """
axes:
  linear_probe.epochs: [5, 10]
cells:
  - {name: r1, pretrain.method: none, pretrain.head.kind: mlp}
  - {name: r2, pretrain.method: none, pretrain.head.kind: none, pretrain.K: 8}
""")
    kinds = [s.kind for s in plan.ordered()]
    # two probe-epoch cells share one MoCo pretraining; the random inits ignore head and K
    assert plan.naive_count == 8
    assert kinds.count("pretrain") == 2 and kinds.count("linear_probe") == 3
    shared = [s for s in plan.ordered() if s.kind == "pretrain" and s.spec["pretrain"]["method"] == "mocov2"][0]
    assert shared.cells == ["linear_probe.epochs=5", "linear_probe.epochs=10"]
    assert shared.values["linear_probe.epochs"] == {"5", "10"}


def test_stage_order_is_topological(tmp_path):
    plan = plan_of(tmp_path, GRID + "axes:\n  pretrain.T: [0.1, 0.2]\n")
    seen = set()
    for s in plan.ordered():
        assert set(s.upstream) <= seen
        seen.add(s.key)


def test_frozen_specs():
    cfg = StageConfig()
    try:
        cfg.pretrain.K = 3  # type: ignore[misc]
    except dataclasses.FrozenInstanceError:
        return
    raise AssertionError("specs must be frozen")


def test_an_evaluation_can_follow_only_some_cells(tmp_path):
    plan = plan_of(tmp_path, GRID + """
axes:
  pretrain.head.kind: [mlp, none]
cells:
  - {name: random-init, pretrain.method: none}
evaluations:
  linear_probe: all
  knn: [head.kind=mlp, random-init]
""")
    assert {c: sorted(kinds) for c, kinds in plan.cells.items()} == {
        "head.kind=mlp": ["knn", "linear_probe", "pretrain"],
        "head.kind=none": ["linear_probe", "pretrain"],
        "random-init": ["knn", "linear_probe", "pretrain"]}
    # the list form still means every cell
    listed = plan_of(tmp_path, GRID + "axes:\n  pretrain.head.kind: [mlp, none]\nevaluations: [knn]\n")
    assert all("knn" in kinds for kinds in listed.cells.values())


def test_fields_added_later_keep_old_identities(tmp_path):
    # Golden keys of the quickstart's stages, computed before pretrain.optimizer, lars_eta,
    # exclude_bias_norm and lr_scaling existed: at their legacy values they stay out of the identity,
    # so finished quickstart stages are still found after an upgrade.
    from pathlib import Path

    plan = build_plan(load_grid(Path(__file__).parents[2] / "grids" / "quickstart.yaml"))
    assert {s.key for s in plan.ordered() if s.kind == "pretrain"} == {"1bce5a3cbbe6", "318c0d8fe27c", "90b4441accff"}
    sgd = plan_of(tmp_path, GRID)
    lars = plan_of(tmp_path, GRID.replace("K: 64}", "K: 64, optimizer: lars}"))
    pre = [[s for s in p.ordered() if s.kind == "pretrain"][0] for p in (sgd, lars)]
    assert "optimizer" not in pre[0].identity["pretrain"] and "lars_eta" not in pre[0].identity["pretrain"]
    assert pre[1].identity["pretrain"]["optimizer"] == "lars" and pre[0].key != pre[1].key
    eta = plan_of(tmp_path, GRID.replace("K: 64}", "K: 64, lars_eta: 0.01}"))
    assert [s.key for s in eta.ordered()] == [s.key for s in sgd.ordered()]  # SGD does not read the eta


def test_identities_of_the_shipped_grids_are_pinned():
    """Every stage key of the four shipped grids. quickstart, methods and paper-mini are those of
    5a91e3e (before precision, processes and the new data path: their stages run in fp32 on CPUs, the
    legacy value); paper's changed on purpose: bf16 and bn_splits 8 on 8 GPUs, and its ImageFolder streamed
    (in_memory null joined the identity of ImageFolder stages, with true as the legacy value). Every
    linear_probe key changed on purpose (issue 11): the probe trains on every image (drop_last false;
    true, the legacy value, gives back the old keys, see test_probe_drop_last_...)."""
    import json

    from pipeline.grid import load_grid
    from pipeline.plan import build_plan

    pinned = json.loads((Path(__file__).parent / "identities.json").read_text())
    grids = Path(__file__).resolve().parents[2] / "grids"
    for name, keys in pinned.items():
        plan = build_plan(load_grid(grids / f"{name}.yaml"))
        assert sorted(f"{s.kind}/{s.key}" for s in plan.ordered()) == keys, name


def test_probe_drop_last_true_gives_back_the_probe_keys_from_before_the_field():
    """Probes dropped each epoch's last partial batch until issue 11; those stages keep their keys
    (and meaning) under ``linear_probe.drop_last: true``, while the default (false) is a new stage."""
    grid = Path(__file__).resolve().parents[2] / "grids" / "quickstart.yaml"
    before = {"056084249809", "1f7409491977", "78e79913eb0b"}  # quickstart's probe keys before the field
    legacy = build_plan(load_grid(grid, ["linear_probe.drop_last=true"]))
    assert {s.key for s in legacy.ordered() if s.kind == "linear_probe"} == before
    new = build_plan(load_grid(grid))
    assert not before & {s.key for s in new.ordered() if s.kind == "linear_probe"}
    assert {s.key for s in new.ordered() if s.kind != "linear_probe"} == \
        {s.key for s in legacy.ordered() if s.kind != "linear_probe"}

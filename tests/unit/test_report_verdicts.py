"""The report's verdicts on a real MLflow SQLite store: only finished seeds count, a report of
another plan refuses and leaves the stored verdicts, ``--study`` touches only its study, the looks
are remembered, the opening says what ``--decide`` would do next."""
from __future__ import annotations

import json

import pytest

from pipeline.grid import load_grid
from pipeline.plan import build_plan
from pipeline.report import LOOKS, OVERRIDES, _read_run_json, cell_table, replicate_values, stage_runs, write_report
from pipeline.state import StateError
from pipeline.tracking import client, prepare_runs

GRID = """
name: verdicts
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {epochs: 1, batch_size: 16, K: 32}
{seeds}
studies:
  table1:
    axes: {pretrain.head.kind: [mlp, none]}
  other:
    axes: {pretrain.lr: [0.05, 0.06]}
cells:
  - {name: random-init, pretrain.method: none}
evaluations: [linear_probe]
"""
MLP, NONE = "table1/head.kind=mlp", "table1/head.kind=none"
CLAIM_TAG = "sslgrid.claim.table1.mlp-beats-none"


def _grid(tmp_path, seeds="seeds: [0, 1, 2]", overrides=(), studies=()):
    (tmp_path / "g.yaml").write_text(GRID.replace("{seeds}", seeds))
    return load_grid(tmp_path / "g.yaml", list(overrides), workdir=str(tmp_path / "runs"),
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", only_studies=list(studies))


def _log(plan, run_ids, key, value, name="top1", status="FINISHED"):
    c = client(plan.grid.tracking_uri)
    c.log_metric(run_ids[key], name, value)
    c.set_terminated(run_ids[key], status)


def _finish_all(plan, run_ids, top1):
    for (base, seed), v in top1.items():
        cell = f"{base}@seed={seed}" if any(c.name == f"{base}@seed={seed}" for c in plan.grid.cells) else base
        _log(plan, run_ids, plan.cells[cell]["pretrain"], 5.0, "loss")
        _log(plan, run_ids, plan.cells[cell]["linear_probe"], v)


CLEAR = {(MLP, 0): 45.0, (MLP, 1): 45.1, (MLP, 2): 45.0, (NONE, 0): 40.0, (NONE, 1): 40.1, (NONE, 2): 40.05}


def test_a_killed_pretraining_is_not_a_seed(tmp_path):
    plan = build_plan(_grid(tmp_path))
    _, parent, run_ids = prepare_runs(plan)
    _finish_all(plan, run_ids, {(MLP, 0): 45.0, (NONE, 0): 40.0, (NONE, 1): 40.1})
    # seed 1 of the MLP cell: its pretraining logged a loss and was killed; its probe logged a top-1
    # mid-training and was killed with it
    _log(plan, run_ids, plan.cells[f"{MLP}@seed=1"]["pretrain"], 4.36, "loss", status="KILLED")
    _log(plan, run_ids, plan.cells[f"{MLP}@seed=1"]["linear_probe"], 44.0, status="KILLED")
    # seed 2's probe is still running
    _log(plan, run_ids, plan.cells[f"{MLP}@seed=2"]["linear_probe"], 43.0, status="RUNNING")
    df = stage_runs(plan)
    values = replicate_values(plan, df)
    assert values[MLP][("linear_probe", "top1")] == {0: 45.0}
    assert values[MLP][("pretrain", "loss")] == {0: 5.0}
    row = cell_table(plan, df, values).set_index("cell").loc[MLP]
    assert row["linear_probe_top1"].n == 1 and row["pretrain_loss"].n == 1
    assert row["state"].startswith("killed (1/3 seeds done)")


def test_a_report_of_another_plan_refuses_and_keeps_the_stored_verdicts(tmp_path):
    plan = build_plan(_grid(tmp_path))
    _, parent, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    c.set_tag(parent, OVERRIDES, json.dumps({"overrides": [], "studies": []}))  # as `sslgrid run` records it
    _finish_all(plan, run_ids, CLEAR)
    text, files = write_report(plan, parent, overrides=[])
    stored = c.get_run(parent).data.tags[CLAIM_TAG]
    assert stored.startswith("holds")
    md = files[0].read_text()
    # the report a user gets by forgetting -o: every pretraining is another stage
    other = build_plan(_grid(tmp_path, overrides=["pretrain.epochs=2"]))
    with pytest.raises(StateError, match=r"this report's -o flags \(-o pretrain.epochs=2\) are not those of the "
                                         r"grid's last run \(\(no -o flags\); `sslgrid run .*g.yaml`\).*Pass the "
                                         r"run's flags"):
        write_report(other, overrides=["pretrain.epochs=2"])
    assert c.get_run(parent).data.tags[CLAIM_TAG] == stored and files[0].read_text() == md
    # a plan whose stages are not all finished yet (a run in progress) reports, but a claim it cannot
    # test yet keeps its stored verdict instead of "not tested"
    longer = build_plan(_grid(tmp_path, seeds="seeds: [0, 1, 2, 3]"))
    prepare_runs(longer)
    c.delete_tag(parent, OVERRIDES)
    _, _, ids = prepare_runs(longer)
    for key in ids.values():  # every stage unfinished, as if it had just started
        if key not in run_ids.values():
            c.set_terminated(key, "RUNNING")
    write_report(longer, parent, overrides=[])
    assert c.get_run(parent).data.tags[CLAIM_TAG].startswith("holds")


def test_a_report_without_the_runs_repeats_refuses_though_seed_0_is_tracked(tmp_path, capsys):
    """`sslgrid run g.yaml -o repeats=3` then `sslgrid report g.yaml`: every stage of the report's
    plan is tracked (seed 0 is the stage the grid runs without seeds), yet it is another plan. It
    refuses (exit 2) naming both sets of flags and the fix, and writes nothing: no file, no claim
    tag, no look. The run's flags in any order report; --study and --correction still work."""
    from pipeline.cli import main

    flags = ["repeats=3", "linear_probe.epochs=4"]
    plan = build_plan(_grid(tmp_path, seeds="", overrides=flags))
    _, parent, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    c.set_tag(parent, OVERRIDES, json.dumps({"overrides": flags, "studies": []}))  # as `sslgrid run` records it
    _finish_all(plan, run_ids, CLEAR)
    _, files = write_report(plan, parent, overrides=flags)
    out = plan.grid.workdir / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tags = dict(c.get_run(parent).data.tags)
    looks = _read_run_json(c, parent, LOOKS)
    assert tags[CLAIM_TAG].startswith("holds") and looks == {"table1.mlp-beats-none": [3]}
    one_seed = build_plan(_grid(tmp_path, seeds="", overrides=flags[1:]))  # the report without -o repeats=3
    assert set(one_seed.stages) <= set(stage_runs(one_seed).index)  # the old check let this through
    common = ["--workdir", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for report_flags in ([], ["-o", "repeats=3"], ["-o", "linear_probe.epochs=4", "--study", "table1"]):
        capsys.readouterr()
        assert main(["report", str(tmp_path / "g.yaml"), *report_flags, *common]) == 2, report_flags
        err = capsys.readouterr().err
        assert "are not those of the grid's last run (-o repeats=3 -o linear_probe.epochs=4" in err, err
        assert "Pass the run's flags: `sslgrid report" in err and "-o repeats=3 -o linear_probe.epochs=4`" in err
        assert "Nothing was written." in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert dict(c.get_run(parent).data.tags) == tags and _read_run_json(c, parent, LOOKS) == looks
    # the run's flags, in another order, report; so do --study and --correction with them
    assert main(["report", str(tmp_path / "g.yaml"), "-o", "linear_probe.epochs=4", "-o", "repeats=3", *common]) == 0
    assert main(["report", str(tmp_path / "g.yaml"), "-o", "linear_probe.epochs=4", "-o", "repeats=3",
                 "--study", "table1", *common]) == 0
    assert c.get_run(parent).data.tags[CLAIM_TAG].startswith("holds")


def test_an_edited_grid_with_the_runs_flags_refuses(tmp_path, capsys):
    """The run's own -o flags over a grid file edited since the run (another pretraining length: other
    stage identities) passed the flags check and replaced the stored report with "not tested". It
    refuses (exit 2), names a stage that never ran and the fix, and writes nothing."""
    from pipeline.cli import main

    flags = ["repeats=3"]
    plan = build_plan(_grid(tmp_path, seeds="", overrides=flags))
    _, parent, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    c.set_tag(parent, OVERRIDES, json.dumps({"overrides": flags, "studies": []}))
    _finish_all(plan, run_ids, CLEAR)
    write_report(plan, parent, overrides=flags)
    out = plan.grid.workdir / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tags = dict(c.get_run(parent).data.tags)
    edited = (tmp_path / "g.yaml").read_text().replace("{epochs: 1, batch_size: 16", "{epochs: 2, batch_size: 16", 1)
    assert edited != (tmp_path / "g.yaml").read_text()
    (tmp_path / "g.yaml").write_text(edited)
    common = ["--workdir", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["report", str(tmp_path / "g.yaml"), "-o", "repeats=3", *common]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "stages were never run" in err and "Run it first" in err and "Nothing was written." in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert dict(c.get_run(parent).data.tags) == tags


def test_another_correction_is_printed_only(tmp_path, capsys):
    """`report --correction none` on a grid decided with Holm shows the raw verdicts but writes no
    file and touches no tag or look: report.md, claims.csv and the claim tags keep Holm's."""
    from pipeline.cli import main

    plan = build_plan(_grid(tmp_path))
    _, parent, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    c.set_tag(parent, OVERRIDES, json.dumps({"overrides": [], "studies": []}))
    _finish_all(plan, run_ids, CLEAR)
    write_report(plan, parent, overrides=[])
    out = plan.grid.workdir / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tags, looks = dict(c.get_run(parent).data.tags), _read_run_json(c, parent, LOOKS)
    common = [str(tmp_path / "g.yaml"), "--workdir", str(tmp_path / "runs"),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for correction in ("none", "bonferroni"):
        capsys.readouterr()
        assert main(["report", *common, "--correction", correction]) == 0
        shown = capsys.readouterr().out
        assert f"Printed only: --correction {correction} is not this grid's correction (holm)" in shown
        assert f"nothing written: --correction {correction} is a preview" in shown and "written: /" not in shown
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert dict(c.get_run(parent).data.tags) == tags and _read_run_json(c, parent, LOOKS) == looks
    # the grid's own correction, named, writes as a plain report does
    assert main(["report", *common, "--correction", "holm"]) == 0
    assert "written: " in capsys.readouterr().out


def test_a_report_of_one_study_touches_only_that_study(tmp_path):
    plan = build_plan(_grid(tmp_path))
    _, parent, run_ids = prepare_runs(plan)
    top1 = dict(CLEAR)
    top1.update({(f"other/lr={lr}", s): 30.0 + s for lr in (0.05, 0.06) for s in range(3)})
    _finish_all(plan, run_ids, top1)
    write_report(plan, parent)
    out = plan.grid.workdir / "report"
    c = client(plan.grid.tracking_uri)
    c.set_tag(parent, "sslgrid.claim.fig4.mocov2-flat-in-K", "same: 0.10 [-0.2, 0.4] n=3")  # another study's
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"report.md", "report.csv", "claims.csv", "study-table1.png", "study-other.png"} <= set(before)
    one = build_plan(_grid(tmp_path, studies=["table1"]))
    text, files = write_report(one, parent)
    assert {f.name for f in files} >= {"report-table1.md", "report-table1.csv", "claims-table1.csv"}
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("report.md", "report.csv", "claims.csv", "study-other.png"):
        assert after[name] == before[name], name
    tags = c.get_run(parent).data.tags
    assert tags["sslgrid.claim.fig4.mocov2-flat-in-K"].startswith("same") and tags[CLAIM_TAG].startswith("holds")


def test_looks_are_remembered_and_fixed_n_after_several_looks_is_flagged(tmp_path):
    plan = build_plan(_grid(tmp_path, seeds="seeds: [0, 1]"))
    _, parent, run_ids = prepare_runs(plan)
    _finish_all(plan, run_ids, {k: v for k, v in CLEAR.items() if k[1] < 2})
    text, _ = write_report(plan, parent)
    c = client(plan.grid.tracking_uri)
    assert _read_run_json(c, parent, LOOKS) == {"table1.mlp-beats-none": [2]}
    assert "looked at before" not in text
    write_report(plan, parent)  # the same seeds again: no new look
    assert _read_run_json(c, parent, LOOKS) == {"table1.mlp-beats-none": [2]}
    more = build_plan(_grid(tmp_path))
    _, _, ids = prepare_runs(more)
    _finish_all(more, ids, {k: v for k, v in CLEAR.items() if k[1] == 2})
    text, _ = write_report(more, parent)
    assert _read_run_json(c, parent, LOOKS) == {"table1.mlp-beats-none": [2, 3]}
    assert "table1.mlp-beats-none: n = 2, 3): fixed-n intervals after several looks overstate certainty" in text


def test_the_report_opens_with_the_verdicts_and_what_decide_would_do(tmp_path):
    plan = build_plan(_grid(tmp_path, seeds=""))
    _, parent, run_ids = prepare_runs(plan)
    _finish_all(plan, run_ids, {(MLP, 0): 45.0, (NONE, 0): 40.0})
    text, _ = write_report(plan, parent)
    head = text.split("## Cells")[0]
    assert head.index("Statistics: 1 of 1 claims tested") < head.index("## Verdicts") < head.index("Next:")
    assert "inconclusive  table1.mlp-beats-none  n=1  +5.00 no interval" in head
    assert all(len(line) <= 80 for line in head.split("```")[1].splitlines())
    assert (f"Next: `sslgrid run {plan.grid.path} --decide` would first run {MLP}, {NONE} to 3 seeds "
            f"(4 new pretrainings, 8 stages") in head

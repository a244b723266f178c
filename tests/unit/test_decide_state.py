"""``--decide``'s settings and budget before its first round: the state is saved before round 1 runs
(a killed first round keeps its settings), and a budget the first round alone exceeds is refused by
plan and run (exit 2). Real MLflow SQLite store; no stage runs."""
from __future__ import annotations

import json

import pytest
from rich.console import Console

from pipeline import decide as D
from pipeline.cli import _rounds, main
from pipeline.grid import load_grid
from pipeline.plan import build_plan
from pipeline.report import _read_run_json
from pipeline.tracking import client, prepare_runs

GRID = """
name: decided
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {epochs: 1, batch_size: 16, K: 32}
studies:
  table1:
    axes: {pretrain.head.kind: [mlp, none]}
cells:
  - {name: random-init, pretrain.method: none}
evaluations: [linear_probe]
decide: {start_seeds: 2, max_seeds: 3}
"""


def _args(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "g.yaml").write_text(GRID)
    return [str(tmp_path / "g.yaml"), *extra, "--workdir", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_a_killed_first_round_keeps_its_settings(tmp_path, monkeypatch, capsys):
    """Round 1 killed before its look: decide.json is there already, with the settings it started
    with, so a rerun with changed decide.* settings is refused (exit 2) and report/status read the
    grid at start_seeds, not at one seed."""
    import pipeline.execute

    args = _args(tmp_path)
    grid = load_grid(args[0], [], str(tmp_path / "runs"), args[-1], [])
    state = D.start(grid)
    _, parent, _ = prepare_runs(build_plan(D.grid_at(grid, state)))

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # Ctrl-C during round 1's stages

    monkeypatch.setattr(pipeline.execute, "execute", killed)
    with pytest.raises(KeyboardInterrupt):
        _rounds(grid, state, {}, None, None, "code", parent, Console(file=None), client(grid.tracking_uri))
    saved = json.loads((tmp_path / "runs" / "decide.json").read_text())
    assert saved["rounds"] == 0 and saved["design"]["max_seeds"] == 3 and saved["looks"] == {
        "table1.mlp-beats-none": []}
    assert saved["seeds"]["table1/head.kind=mlp"] == 2
    assert _read_run_json(client(grid.tracking_uri), parent, D.ARTIFACT) == saved  # and on the parent run
    assert D.stored(grid).seeds == saved["seeds"]  # what report and status read the grid at
    capsys.readouterr()
    assert main(["run", *_args(tmp_path, "--decide", "-o", "decide.max_seeds=4")]) == 2
    err = capsys.readouterr().err
    assert "decide settings changed since this decision started (max_seeds 3 → 4)" in err, err
    assert json.loads((tmp_path / "runs" / "decide.json").read_text()) == saved


def test_a_budget_below_the_first_round_is_refused(tmp_path, capsys):
    """The budget includes the first round: one it cannot pay is refused by plan --decide and
    run --decide (exit 2), naming both numbers and the fix; nothing is written."""
    grid = load_grid(_args(tmp_path)[0], [], str(tmp_path / "runs"), f"sqlite:///{tmp_path / 'mlflow.db'}", [])
    first = D.plan_hours(build_plan(D.grid_at(grid, D.start(grid))))
    assert first > 1e-7
    tiny = f"{first / 10:.3g}"
    for command in ("plan", "run"):
        capsys.readouterr()
        assert main([command, *_args(tmp_path, "--decide", "-o", f"decide.budget_gpu_hours={tiny}")]) == 2, command
        err = capsys.readouterr().err
        assert f"decide.budget_gpu_hours = {float(tiny):g}, but the first round alone (5 pretrainings, 10 stages at " \
               f"2 seeds per cell of the claims) costs {first:.4g} GPU-hours" in err, err
        assert "the budget includes the first round. Raise decide.budget_gpu_hours to at least" in err
    assert not (tmp_path / "runs" / "decide.json").exists()
    # a budget that covers the first round plans
    enough = D._up(first)
    assert enough >= first
    assert main(["plan", *_args(tmp_path, "--decide", "-o", f"decide.budget_gpu_hours={enough!r}")]) == 0


def test_after_failed_stages_the_report_says_rerun_to_retry_them(tmp_path, capsys):
    """A round whose stages failed took no look: its report says to rerun `sslgrid run --decide` to
    retry them, not what the next round would run; `plan --decide` says "1 claim"."""
    from pipeline.report import write_report

    args = _args(tmp_path)
    assert main(["plan", *_args(tmp_path, "--decide")]) == 0
    assert "--decide: 1 claim decided together (table1.mlp-beats-none)" in capsys.readouterr().out
    grid = load_grid(args[0], [], str(tmp_path / "runs"), args[-1], [])
    state = D.start(grid)
    plan = build_plan(D.grid_at(grid, state))
    _, parent, run_ids = prepare_runs(plan)
    c = client(grid.tracking_uri)
    for i, key in enumerate(plan.stages):
        if plan.stages[key].kind == "pretrain":
            c.log_metric(run_ids[key], "loss", 5.0)
        else:
            c.log_metric(run_ids[key], "top1", 40.0 + i)
        c.set_terminated(run_ids[key], "FAILED" if i == 0 else "FINISHED")
    text, _ = write_report(plan, parent, decision=state)
    assert (f"Next: 1 stage(s) of round 1 failed or were stopped, and round 1's look waits for them: rerun "
            f"`sslgrid run {grid.path} --decide` (with the same -o flags) to retry them first") in text, text
    assert "Next round of `--decide`" not in text

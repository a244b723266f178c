"""What the driver, ``status`` and ``report`` ask of the store and compute must not grow with the
grid faster than the grid (issue 21, item 3; bench/orchestration_scale.py measures the times). Each
test counts: MLflow client calls and the runs they return (a wrapped ``MlflowClient``, a real
SQLite store in tmp_path), or calls of a pure helper. None times anything."""
from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.grid import load_grid
from pipeline.plan import Plan, build_plan
from pipeline.tracking import client, prepare_runs, write_json


def _grid_plan(tmp_path: Path, n: int, name: str = "scale") -> Plan:
    """The plan of a grid of ``n`` random-init stages (one per seed); nothing tracked."""
    grid = tmp_path / f"{name}{n}.yaml"
    grid.write_text(f"name: {name}{n}\ndefaults:\n  pretrain: {{method: none}}\naxes:\n  pretrain.seed: "
                    f"{list(range(n))}\nevaluations: []\n")
    return build_plan(load_grid(grid, workdir=str(tmp_path / f"wd{n}"),
                                tracking_uri=f"sqlite:///{tmp_path / f'mlflow{n}.db'}"))


def _plan(tmp_path: Path, n: int, name: str = "scale") -> tuple[Plan, str, dict[str, str]]:
    """``_grid_plan`` and its runs in a fresh store."""
    plan = _grid_plan(tmp_path, n, name)
    _, parent_id, run_ids = prepare_runs(plan)
    return plan, parent_id, run_ids


def _finish(plan: Plan, run_ids: dict[str, str], stages) -> None:
    """``stages`` done as a worker leaves them: result.json, DONE, the run FINISHED."""
    c = client(plan.grid.tracking_uri)
    for s in stages:
        d = s.directory(plan.grid.workdir)
        write_json(d.result, {"checkpoint": str(d / "none"), "feat_dim": 1, "epochs": 1, "seconds": 0.1})
        write_json(d.done, {"finished": 0})
        c.set_terminated(run_ids[s.key], "FINISHED")


class Calls:
    """Calls of MlflowClient's reading methods, and the runs its searches returned."""

    READS = ("get_run", "search_runs", "get_experiment_by_name", "get_experiment")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: Counter[str] = Counter()
        self.runs_read = 0
        for name in self.READS:
            monkeypatch.setattr(MlflowClient, name, self._counted(name, getattr(MlflowClient, name)))

    def _counted(self, name: str, method):
        def counted(client_self, *a, **kw):
            self.calls[name] += 1
            out = method(client_self, *a, **kw)
            if name == "search_runs":
                self.runs_read += len(out)
            return out
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.runs_read = 0


def test_the_driver_reads_run_statuses_in_one_query_however_many_stages(tmp_path, monkeypatch):
    """Before: ``_cached`` and ``settle`` each called get_run once per stage: a cached rerun of
    5,000 stages read 10,000 runs one by one."""
    from pipeline.execute import _cached, settle

    counted = {}
    for n in (2, 12):
        plan, _, run_ids = _plan(tmp_path, n)
        _finish(plan, run_ids, plan.ordered())
        calls = Calls(monkeypatch)
        outcomes, pending = _cached(plan, run_ids)
        assert not pending and all(o.state == "cached" for o in outcomes.values())
        assert settle(plan, run_ids, "test", wait_s=0) == []
        counted[n] = dict(calls.calls)
        monkeypatch.undo()
    assert counted[12] == counted[2], counted
    assert counted[12].get("get_run", 0) == 0, counted


def test_the_one_query_still_sets_each_status_right(tmp_path):
    """A stage done whose run says RUNNING (a crash between DONE and the status) becomes FINISHED; a
    pending stage whose run was KILLED is SCHEDULED again; settle kills what nothing runs."""
    from pipeline.execute import _cached, settle

    plan, _, run_ids = _plan(tmp_path, 4)
    c = client(plan.grid.tracking_uri)
    a, b, *rest = plan.ordered()
    _finish(plan, run_ids, [a])
    c.update_run(run_ids[a.key], status="RUNNING")
    c.set_terminated(run_ids[b.key], "KILLED")
    outcomes, pending = _cached(plan, run_ids)
    assert set(outcomes) == {a.key} and [s.key for s in pending] == [b.key] + [s.key for s in rest]
    status = {s.key: c.get_run(run_ids[s.key]).info.status for s in plan.ordered()}
    assert status == {a.key: "FINISHED", **{s.key: "SCHEDULED" for s in [b, *rest]}}
    assert sorted(settle(plan, run_ids, "test", wait_s=0)) == sorted(s.key for s in [b, *rest])
    assert {c.get_run(run_ids[s.key]).info.status for s in [b, *rest]} == {"KILLED"}


def test_the_grid_run_is_found_without_reading_the_stage_runs(tmp_path, monkeypatch):
    """Before: ``running_driver`` (run, status), ``landing_page`` (ui) and the report's parent read
    every stage run of the grid to find the one grid run."""
    from pipeline.report import _parent
    from pipeline.tracking import landing_page, running_driver

    plan, parent_id, _ = _plan(tmp_path, 12)
    c = client(plan.grid.tracking_uri)
    c.update_run(parent_id, status="RUNNING")
    c.set_tag(parent_id, "sslgrid.driver", '{"pid": 1, "host": "h"}')
    exp_id = c.get_experiment_by_name(plan.grid.name).experiment_id
    calls = Calls(monkeypatch)
    assert running_driver(plan.grid.tracking_uri, plan.grid.name) == {"pid": 1, "host": "h"}
    assert _parent(plan, None).info.run_id == parent_id
    assert f"/runs/{parent_id}" in landing_page(plan.grid.tracking_uri, exp_id, plan.grid.name)
    assert calls.runs_read == 3, calls.runs_read  # the grid run, once for each


def test_baselines_are_found_in_time_linear_in_the_cells(tmp_path, monkeypatch):
    """Before: each cell of a study scanned the study's cells for its baseline row, comparing
    resolved values: cells² comparisons (25 million for a 5,000-cell study)."""
    import pipeline.report as R

    def baselines_of(rows: int) -> tuple[dict[str, str], int]:
        grid = tmp_path / f"b{rows}.yaml"
        grid.write_text(textwrap.dedent(f"""
            name: b{rows}
            defaults:
              pretrain: {{method: none}}
            axes:
              backbone.bn_splits: {list(range(1, rows + 1))}
              backbone.cifar_stem: [false, true]
            evaluations: []
            """))
        plan = build_plan(load_grid(grid, workdir=str(tmp_path / "wd"), tracking_uri=f"sqlite:///{tmp_path}/m.db"))
        calls = Counter()
        original = R._resolved
        monkeypatch.setattr(R, "_resolved", lambda cell, key: calls.update([key]) or original(cell, key))
        try:
            return R.baselines(plan), sum(calls.values())
        finally:
            monkeypatch.setattr(R, "_resolved", original)

    _, calls_small = baselines_of(5)
    large, calls_large = baselines_of(50)
    name = "backbone.bn_splits={},backbone.cifar_stem={}".format
    # a cell with the stem is compared with the cell of its bn_splits without it (the last axis's first
    # value); one without, with the study's first cell
    assert large == {**{name(k, True): name(k, False) for k in range(1, 51)},
                     **{name(k, False): name(1, False) for k in range(2, 51)}}
    assert calls_large <= 10 * calls_small + 100, (calls_small, calls_large)  # linear: 10x the cells, not 100x


def test_a_poll_of_progress_looks_at_a_bounded_number_of_stages(tmp_path, monkeypatch):
    """Before: every half second the driver looked for the progress file of every stage still
    waiting: O(stages) per poll, O(stages²) per run. Now: those that reported, and a bounded window of
    the others, which still reaches every stage in turn."""
    import io

    from rich.console import Console

    from pipeline import execute as E
    from pipeline.plan import Stage

    # the bounds as pipeline/execute.py sets them (the old code, which had none, is held to the same)
    POLL_HEAD, POLL_WINDOW = getattr(E, "POLL_HEAD", 64), getattr(E, "POLL_WINDOW", 192)

    looked: Counter[str] = Counter()
    original = Stage.directory
    monkeypatch.setattr(Stage, "directory", lambda self, workdir: looked.update([self.key]) or original(self, workdir))
    plan = _grid_plan(tmp_path, 40 + POLL_HEAD + 3 * POLL_WINDOW)
    pending = plan.ordered()
    last = pending[-1]
    write_json(last.directory(plan.grid.workdir).progress, {"done": 1, "total": 2, "time": 0})
    with E._Display(Console(file=io.StringIO()), plan, pending, 0) as display:
        polls = 0
        while last.key not in display.seen:
            looked.clear()
            display.poll(pending)
            polls += 1
            assert len(looked) <= POLL_HEAD + POLL_WINDOW + len(display.seen), len(looked)
        assert polls <= 4 + 1, polls  # every stage is reached within (stages - POLL_HEAD) / POLL_WINDOW polls
        looked.clear()
        display.poll(pending)
        assert looked[last.key] == 1  # one that reported is read at every poll


def test_resources_are_checked_once_per_stage_kind(tmp_path):
    """Before: ``_submit`` asked the backend (``ray.cluster_resources()``, a call to the GCS) once per stage."""
    from pipeline.execute import _submit, run_stage

    class Backend:
        def __init__(self) -> None:
            self.checks, self.submitted = 0, []

        def resources(self) -> dict[str, float]:
            return {"CPU": 2.0}

        def check_fits(self, label: str, cpus: float, gpus: float) -> None:
            self.checks += 1

        def submit(self, fn, args, *, name, cpus, gpus, retries=0, processes=1):
            assert fn is run_stage
            self.submitted.append((name, cpus, gpus, processes))
            return name

    plan = _grid_plan(tmp_path, 30)
    backend = Backend()
    refs = _submit(plan, {s.key: f"run-{s.key}" for s in plan.ordered()}, backend, plan.ordered(), {}, None)
    assert backend.checks == 1 and len(refs) == 30
    assert {(cpus, gpus, processes) for _, cpus, gpus, processes in backend.submitted} == {(1.0, 0.0, 1)}


def test_duplicate_cell_names_are_each_named_once(tmp_path):
    """Duplicates are found by counting the names once (``list.count`` per name was cells²); each
    duplicated name is reported once, however often it repeats. (No count of comparisons can be
    taken of ``list.count``: this test holds the behaviour, bench/orchestration_scale.py the cost.)"""
    from pipeline.grid import GridError

    grid = tmp_path / "dup.yaml"
    grid.write_text(textwrap.dedent("""
        name: dup
        defaults:
          pretrain: {method: none}
        cells:
          - {name: a}
          - {name: b, pretrain.seed: 1}
          - {name: a, pretrain.seed: 2}
          - {name: a, pretrain.seed: 3}
        evaluations: []
        """))
    with pytest.raises(GridError) as err:
        load_grid(grid, workdir=str(tmp_path / "wd"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    text = str(err.value)
    assert text.count("cells = 'a': two cells share this name") == 1 and "'b'" not in text, text


def test_a_large_grid_shows_bars_only_for_running_and_failed_stages(tmp_path):
    """Before: a bar per stage, every one rendered at each refresh (ten a second on a terminal; 2.9 s
    a render at 5,000 bars). A small grid keeps a bar per stage."""
    import io

    from rich.console import Console

    from pipeline import execute as E

    max_bars = getattr(E, "MAX_BARS", 40)
    plan = _grid_plan(tmp_path, 3 * max_bars)
    pending = plan.ordered()
    running, finished, failed = pending[0], pending[1], pending[2]
    write_json(running.directory(plan.grid.workdir).progress, {"done": 1, "total": 2, "time": 0})
    with E._Display(Console(file=io.StringIO(), force_terminal=True), plan, pending, 0) as display:
        display.poll(pending)
        display.finish(E.Outcome(finished, "done"))
        display.finish(E.Outcome(failed, "failed", error="boom"))
        visible = {key for key, t in display.tasks.items() if display.progress.tasks[t].visible}
        grid_bar = display.progress.tasks[display.overall]
    assert visible == {running.key, failed.key}, visible
    assert grid_bar.visible and grid_bar.completed == 2 and grid_bar.fields["note"] == "finished 1 · failed 1"

    small = _grid_plan(tmp_path, 3, name="small")
    with E._Display(Console(file=io.StringIO(), force_terminal=True), small, small.ordered(), 0) as display:
        display.finish(E.Outcome(small.ordered()[0], "done"))
        assert all(t.visible for t in display.progress.tasks)

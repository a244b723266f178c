"""pipeline/execute.py on the in-process backend (cluster/inprocess.py): failure propagation, caching
and resume without a Ray cluster. A tiny real grid (tiny_resnet, 32-px synthetic data, 1 epoch), a
real MLflow SQLite store in tmp_path, real stage functions; the failure is a real input, a damaged
checkpoint left in the stage's folder."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from cluster.backend import Backend, ResourceError
from cluster.inprocess import InProcessBackend
from pipeline.execute import Outcome, execute
from pipeline.grid import load_grid
from pipeline.plan import Plan, Stage, build_plan
from pipeline.tracking import ERROR, prepare_runs

GRID = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48, image_size: 32}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 1, batch_size: 32, lr: 0.03, K: 32, m: 0.99}
  linear_probe: {epochs: 1, batch_size: 48}
cells:
  - {name: random, pretrain.method: none}
  - {name: moco}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
  linear_probe: {cpus: 1}
"""
TIMINGS = ("seconds", "epoch_seconds", "images_per_second")


def load(tmp: Path, text: str = GRID) -> tuple[Plan, dict[str, str]]:
    """The grid's plan in ``tmp``, and its MLflow runs in a fresh SQLite store there."""
    (tmp / "grid.yaml").write_text(textwrap.dedent(text))
    grid = load_grid(tmp / "grid.yaml", workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    plan = build_plan(grid)
    return plan, prepare_runs(plan)[2]


def run(plan: Plan, run_ids: dict[str, str], backend: InProcessBackend) -> dict[str, Outcome]:
    return execute(plan, run_ids, lambda: backend, Console(file=io.StringIO()))


def stage(plan: Plan, kind: str, cell: str) -> Stage:
    return next(s for s in plan.stages.values() if s.kind == kind and cell in s.cells)


def states(plan: Plan, outcomes: dict[str, Outcome]) -> dict[tuple[str, str], str]:
    return {(s.kind, s.cells[0]): outcomes[s.key].state for s in plan.stages.values()}


def damage_checkpoint(plan: Plan, s: Stage) -> Path:
    """A checkpoint that cannot be read where the stage resumes from: it fails before training."""
    ckpt = s.directory(plan.grid.workdir) / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    return ckpt


def metrics(result) -> dict[str, float]:
    """A result's numbers (trainers/results.py), without the ones that measure time."""
    return {k: v for k, v in result.metrics.items() if k not in TIMINGS}


def statuses(plan: Plan, run_ids: dict[str, str]) -> dict[tuple[str, str], str]:
    c = MlflowClient(plan.grid.tracking_uri)
    return {(s.kind, s.cells[0]): c.get_run(run_ids[s.key]).info.status for s in plan.stages.values()}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Stages run in this process: keep what they change of it (cwd: MLflow's ./mlruns; the CPU
    count a stage exports) to this test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLGRID_CPUS", "1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict]:
    """The grid run once without a failure: stage key → result."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("SSLGRID_CPUS", "1")
        plan, run_ids = load(tmp)
        outcomes = run(plan, run_ids, InProcessBackend())
    assert {o.state for o in outcomes.values()} == {"done"}, outcomes
    return {k: o.result for k, o in outcomes.items()}


def test_every_backend_implements_the_protocol(tmp_path):
    from cluster.ray_backend import RayBackend
    from cluster.slurm_backend import SlurmBackend

    for backend in (InProcessBackend(), RayBackend(), SlurmBackend(tmp_path, lambda name: None, lambda name: tmp_path)):
        assert isinstance(backend, Backend), type(backend)


def test_a_failure_stops_its_downstream_and_spares_independent_stages(tmp_path):
    plan, run_ids = load(tmp_path)
    moco, probe = stage(plan, "pretrain", "moco"), stage(plan, "linear_probe", "moco")
    damage_checkpoint(plan, moco)
    backend = InProcessBackend()
    outcomes = run(plan, run_ids, backend)

    assert states(plan, outcomes) == {("pretrain", "random"): "done", ("linear_probe", "random"): "done",
                                      ("pretrain", "moco"): "failed", ("linear_probe", "moco"): "upstream_failed"}
    assert "CheckpointError" in outcomes[moco.key].error and "last.pt" in outcomes[moco.key].error
    assert outcomes[probe.key].error == f"not run: upstream {moco.label} failed"
    assert len(backend.submitted) == 4 and backend.entered == 1
    # the downstream stage never started: its folder holds nothing
    assert not Path(probe.directory(plan.grid.workdir)).exists()
    # the store says the same, and why
    assert statuses(plan, run_ids) == {("pretrain", "random"): "FINISHED", ("linear_probe", "random"): "FINISHED",
                                       ("pretrain", "moco"): "FAILED", ("linear_probe", "moco"): "KILLED"}
    c = MlflowClient(plan.grid.tracking_uri)
    assert "CheckpointError" in c.get_run(run_ids[moco.key]).data.tags[ERROR]
    assert c.get_run(run_ids[probe.key]).data.tags[ERROR] == outcomes[probe.key].error


def test_done_stages_are_cached_and_never_submitted(tmp_path):
    plan, run_ids = load(tmp_path)
    first = run(plan, run_ids, InProcessBackend())
    assert {o.state for o in first.values()} == {"done"}

    started = []
    again = execute(plan, run_ids, lambda: started.append(1) or InProcessBackend(), Console(file=io.StringIO()))
    assert started == []  # every stage was done: no backend at all
    assert {o.state for o in again.values()} == {"cached"}
    assert {k: o.result for k, o in again.items()} == {k: o.result for k, o in first.items()}

    # one evaluation's DONE gone: only it is submitted, with its pretraining's cached result
    probe = stage(plan, "linear_probe", "moco")
    (probe.directory(plan.grid.workdir) / "DONE").unlink()
    backend = InProcessBackend()
    third = run(plan, run_ids, backend)
    assert backend.names() == [f"linear_probe:{probe.key}"]
    upstream = backend.submitted[0].args[1]
    assert upstream == first[probe.upstream[0]].result  # a value, not another task's handle
    assert third[probe.key].state == "done" and metrics(third[probe.key].result) == metrics(first[probe.key].result)
    assert {o.state for k, o in third.items() if k != probe.key} == {"cached"}


def test_a_rerun_after_a_failure_reruns_only_it_and_its_downstream_and_matches_uninterrupted(
        tmp_path, uninterrupted):
    plan, run_ids = load(tmp_path)
    moco, probe = stage(plan, "pretrain", "moco"), stage(plan, "linear_probe", "moco")
    damaged = damage_checkpoint(plan, moco)
    assert states(plan, run(plan, run_ids, InProcessBackend()))[("pretrain", "moco")] == "failed"

    damaged.unlink()  # the fix the error names
    backend = InProcessBackend()
    outcomes = run(plan, run_ids, backend)
    assert backend.names() == [f"pretrain:{moco.key}", f"linear_probe:{probe.key}"]
    assert states(plan, outcomes) == {("pretrain", "random"): "cached", ("linear_probe", "random"): "cached",
                                      ("pretrain", "moco"): "done", ("linear_probe", "moco"): "done"}
    assert {k: metrics(o.result) for k, o in outcomes.items()} == {k: metrics(r) for k, r in uninterrupted.items()}
    # the same MLflow runs, now all finished, the failure's error cleared
    assert prepare_runs(plan)[2] == run_ids
    assert set(statuses(plan, run_ids).values()) == {"FINISHED"}
    assert MlflowClient(plan.grid.tracking_uri).get_run(run_ids[moco.key]).data.tags[ERROR] == ""


def test_a_stage_too_big_for_the_backend_is_refused_before_anything_runs(tmp_path):
    plan, run_ids = load(tmp_path, GRID.replace("pretrain: {cpus: 1}", "pretrain: {cpus: 4}"))
    backend = InProcessBackend(cpus=2)
    with pytest.raises(ResourceError, match=r"^resources.pretrain asks for 4 CPUs but the in-process backend has 2"):
        run(plan, run_ids, backend)
    assert backend.submitted == [] and not plan.grid.workdir.exists()

"""A plan on SLURM (``--backend slurm``): each stage's request from the grid's ``cluster:`` section,
the backend checked against ``sinfo`` before anything is submitted, and each stage's marker.

The request itself (``SlurmParams``, every parameter and default declared once) lives in
cluster/slurm_jobs.py; the jobs are submitted and watched by cluster/slurm_backend.py.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.slurm_jobs import SlurmConfigError, SlurmParams, check_params
from cluster.slurm_jobs import partitions as read_partitions
from pipeline.backends import BackendError
from pipeline.grid import Grid
from pipeline.plan import Plan, Stage


def task_name(stage: Stage) -> str:
    return f"{stage.kind}:{stage.key}"


def slurm_params(grid: Grid, kind: str, partitions: dict[str, dict[str, Any]]) -> SlurmParams:
    """The SLURM request of a ``kind`` stage: ``cluster.<kind>`` over ``cluster.default`` over the
    stage's ``resources``: its GPUs spread over ``nodes`` (gpus_per_node), one task per GPU
    (tasks_per_node = processes / nodes), its CPUs shared by the tasks (cpus_per_task); then the
    defaults of ``SlurmParams``. GPUs default to one when the chosen partition has any, else none.
    ``partitions``: as ``cluster.slurm_jobs.partitions()`` gives them."""
    asked = grid.cluster.get(kind, SlurmParams()).over(grid.cluster.get("default", SlurmParams()))
    res = grid.resources[kind]
    part_name = asked.partition or next((n for n, i in partitions.items() if i["default"]), None)
    part_gpus = partitions.get(part_name or "", {}).get("gpus", 0)
    nodes = asked.resolved().nodes
    gpus = asked.gpus_per_node
    if gpus is None:
        total_gpus = res.gpus if res.gpus is not None else (1 if part_gpus > 0 else 0)
        gpus = math.ceil(total_gpus / nodes)
    tasks = asked.tasks_per_node
    if tasks is None:  # one task per GPU, unless resources name the processes
        tasks = math.ceil(res.processes / nodes) if res.processes else max(1, int(gpus))
    cpus = asked.cpus_per_task
    if cpus is None:
        cpus = max(1, math.floor(res.cpus / (tasks * nodes)))
    return replace(asked, nodes=nodes, tasks_per_node=tasks, gpus_per_node=int(gpus),
                   cpus_per_task=int(cpus)).resolved()


def slurm_backend(plan: Plan, env_vars: dict[str, str], poll_s: float = 2.0) -> Callable[..., Any]:
    """A factory for the SLURM backend of ``plan`` (``factory(code_dir=None)``, ``code_dir`` being the
    code snapshot the jobs start in), after checking every request against ``sinfo``. ``poll_s``:
    seconds between looks at each job. Raises BackendError, naming the grid file, the fields and the
    fix, when sinfo cannot be read or a request cannot be met."""
    from cluster.slurm_backend import SlurmBackend  # imports ray and submitit

    try:
        parts = read_partitions()
    except (SlurmConfigError, FileNotFoundError) as err:
        raise BackendError(f"--backend slurm: cannot read the cluster's partitions ({err}). Is this a SLURM "
                           f"login node (sinfo on the PATH, SLURM_CONF set)?") from None
    params = {task_name(s): slurm_params(plan.grid, s.kind, parts) for s in plan.stages.values()}
    problems = []
    for kind in sorted({s.kind for s in plan.stages.values()}):
        p = next(v for k, v in params.items() if k.startswith(kind + ":"))
        problems += check_params(f"cluster.{kind}", p, parts)
    if problems:
        raise BackendError(f"{plan.grid.path}: " + "; ".join(problems) + ". Nothing was submitted.")
    # each stage's marker: its job id, written by cluster/slurm_backend.py at submission
    markers = {task_name(s): s.directory(plan.grid.workdir).slurm for s in plan.stages.values()}
    folder = plan.grid.workdir / "slurm"

    def factory(code_dir: Path | None = None) -> SlurmBackend:
        return SlurmBackend(folder, params.__getitem__, markers.__getitem__, env_vars=env_vars, poll_s=poll_s,
                            code_dir=code_dir)

    return factory


def slurm_job(stage: Stage, workdir: Path) -> dict[str, Any] | None:
    """The stage's marker: its SLURM job id and state when it was submitted, or None."""
    f = stage.directory(workdir).slurm
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None

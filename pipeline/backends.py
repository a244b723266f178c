"""Which backend runs a plan's stages, and what each stage asks of it.

- ``local``: a private Ray cluster on this machine (the default).
- ``ray``: an existing Ray cluster (``--ray-address``).
- ``slurm``: one SLURM job per stage through submitit, ordered by a local Ray DAG
  (cluster/slurm_backend.py). Requests come from the grid's ``cluster:`` section.

Problems found here are the user's to fix, and are raised as ``BackendError`` before anything is
submitted.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.grid import Grid
from pipeline.plan import Plan, Stage
from pipeline.spec import SlurmSpec

BACKENDS = ("local", "ray", "slurm")
MARKER = "slurm.json"


class BackendError(Exception):
    """A backend option the user must change; the message says which and how."""


def task_name(stage: Stage) -> str:
    return f"{stage.kind}:{stage.key}"


def remote_tracking_problem(uri: str, where: str) -> str | None:
    """Compute nodes log to the tracking store themselves; a SQLite file on this disk is not theirs.
    ``where`` says which machines, e.g. "--backend slurm runs stages on other machines"."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (f"{where}, which cannot write to {uri}. "
            f"Fix: start a tracking server that they can reach (`sslgrid server --host 0.0.0.0`, see "
            f"the README) and pass its address with --tracking-uri http://<this host>:5000.")


def slurm_params(grid: Grid, kind: str, partitions: dict[str, dict[str, Any]]):
    """The SLURM request of a ``kind`` stage: ``cluster.<kind>`` over ``cluster.default`` over the
    stage's ``resources``: its GPUs spread over ``nodes`` (gpus_per_node), one task per GPU
    (tasks_per_node = processes / nodes), its CPUs shared by the tasks (cpus_per_task).
    GPUs default to one when the chosen partition has any, else none."""
    from cluster.slurm_backend import SlurmParams

    default, own = grid.cluster.get("default", SlurmSpec()), grid.cluster.get(kind, SlurmSpec())

    def pick(name: str) -> Any:
        v = getattr(own, name)
        return v if v is not None else getattr(default, name)

    res = grid.resources[kind]
    partition = pick("partition")
    part_name = partition or next((n for n, i in partitions.items() if i["default"]), None)
    part_gpus = partitions.get(part_name or "", {}).get("gpus", 0)
    nodes = pick("nodes") or 1
    total_gpus = res.gpus if res.gpus is not None else (1 if part_gpus > 0 else 0)
    gpus = pick("gpus_per_node")
    if gpus is None:
        gpus = math.ceil(total_gpus / nodes)
    tasks = pick("tasks_per_node")
    if tasks is None:  # one task per GPU, unless resources name the processes
        tasks = math.ceil(res.processes / nodes) if res.processes else max(1, int(gpus))
    cpus = pick("cpus_per_task")
    if cpus is None:
        cpus = max(1, math.floor(res.cpus / (tasks * nodes)))
    return SlurmParams(partition=partition, nodes=nodes,
                       tasks_per_node=tasks,
                       gpus_per_node=int(gpus), cpus_per_task=int(cpus), mem_gb=pick("mem_gb"),
                       timeout_min=pick("timeout_min") or 60, account=pick("account"), qos=pick("qos"),
                       constraint=pick("constraint"), additional_parameters=dict(pick("additional_parameters") or {}),
                       setup=tuple(pick("setup") or ()), array_parallelism=pick("array_parallelism") or 64)


def slurm_backend(plan: Plan, env_vars: dict[str, str], poll_s: float = 2.0):
    """A factory for the SLURM backend of ``plan``, after checking every request against ``sinfo``;
    the factory's ``code_dir`` is the code snapshot the jobs start in."""
    from cluster.slurm_backend import SlurmBackend, SlurmConfigError, check_params, partitions

    try:
        parts = partitions()
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
    markers = {task_name(s): s.directory(plan.grid.workdir) / MARKER for s in plan.stages.values()}
    folder = plan.grid.workdir / "slurm"

    def factory(code_dir: Path | None = None) -> SlurmBackend:
        return SlurmBackend(folder, params.__getitem__, markers.__getitem__, env_vars=env_vars, poll_s=poll_s,
                            code_dir=code_dir)

    return factory


def slurm_job(stage: Stage, workdir: Path) -> dict[str, Any] | None:
    """The stage's marker: its SLURM job id and state when it was submitted, or None."""
    f = stage.directory(workdir) / MARKER
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None

"""SLURM without submitit or Ray: what one job asks for (``SlurmParams``, every parameter declared
once), and what SLURM's own commands say about the cluster and its jobs (``sinfo``, ``squeue``,
``scontrol``, ``scancel``).

Imports neither torch, ray nor submitit: pipeline/spec.py validates a grid's ``cluster:`` section
with ``SlurmParams`` (there named ``SlurmSpec``) on a login node, and a stage reads its own job id
here. cluster/slurm_backend.py submits and watches the jobs.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Seconds before its time limit that SLURM sends a job USR2, so that submitit can requeue it
# (``--signal=USR2@90``); submitit's own default too.
SIGNAL_DELAY_S = 90

# Job states (squeue's %T, scontrol's JobState) of a job that is queued or running, and of one that
# ended without finishing its work.
LIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED", "RESIZING", "COMPLETING")
ENDED_WITHOUT_RESULT = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                        "DEADLINE", "REVOKED", "SPECIAL_EXIT")


class SlurmConfigError(Exception):
    """The SLURM parameters cannot be satisfied by this cluster, or sinfo failed; nothing was submitted."""


def _param(default: Any = None, **meta: Any) -> Any:
    """A request field. Its value None means "not set here": in a grid's ``cluster.<kind>`` it falls
    back to ``cluster.default`` (``over``), then to the stage's resources (pipeline/slurm.py), then
    to ``default`` (``resolved``). ``min`` and ``doc`` are read by pipeline/spec.py's validator."""
    if default is not None:
        meta["default"] = default
        meta["doc"] = f"{meta['doc']}; default {default}" if "doc" in meta else f"default {default}"
    return field(default=None, metadata=meta)


@dataclass(frozen=True)
class SlurmParams:
    """One job's request. Field names follow submitit's (``slurm_`` prefix dropped). A grid's
    ``cluster:`` entry (``default`` or a stage kind) is one of these with some fields unset."""

    partition: str | None = _param(doc="the partition; unset: the cluster's default partition")
    nodes: int | None = _param(1, min=1, doc="nodes per job")
    tasks_per_node: int | None = _param(1, min=1, doc="processes per node, one per GPU (data-parallel)")
    gpus_per_node: int | None = _param(0, min=0, doc="GPUs per node; unset: the stage's resources.gpus over its "
                                                      "nodes, or 1 on a GPU partition")
    cpus_per_task: int | None = _param(1, min=1, doc="CPUs per process; unset: the stage's resources.cpus "
                                                      "shared by its processes")
    mem_gb: float | None = _param(min=0.0, doc="memory per node, GB; unset: the partition's default")
    timeout_min: int | None = _param(60, min=1, doc="time limit, minutes; a job that reaches it is requeued and "
                                                     "resumes from its checkpoint")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional_parameters: dict | None = _param(doc="extra sbatch flags, e.g. {mail-type: END}")
    setup: tuple[str, ...] | None = _param(doc="shell lines run before the job, e.g. module load")
    array_parallelism: int | None = _param(64, min=1, doc="tasks of one job array that run at once")

    def over(self, base: SlurmParams) -> SlurmParams:
        """``base`` with this request's set fields on top (``cluster.<kind>`` over ``cluster.default``)."""
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    def resolved(self) -> SlurmParams:
        """This request with every unset field that has a default set to it."""
        return replace(self, **{f.name: f.metadata["default"] for f in fields(self)
                                if getattr(self, f.name) is None and "default" in f.metadata})

    def executor_kwargs(self) -> dict[str, Any]:
        """submitit's ``update_parameters`` keywords for this request (resolved first)."""
        p = self.resolved()
        kw: dict[str, Any] = {"timeout_min": p.timeout_min, "cpus_per_task": p.cpus_per_task,
                              "nodes": p.nodes, "tasks_per_node": p.tasks_per_node,
                              "slurm_array_parallelism": p.array_parallelism,
                              "slurm_signal_delay_s": SIGNAL_DELAY_S}
        if p.gpus_per_node:
            kw["gpus_per_node"] = p.gpus_per_node
        if p.mem_gb is not None:
            kw["mem_gb"] = p.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(p, name) is not None:
                kw[f"slurm_{name}"] = getattr(p, name)
        if p.additional_parameters:
            kw["slurm_additional_parameters"] = dict(p.additional_parameters)
        if p.setup:
            kw["slurm_setup"] = list(p.setup)
        if p.nodes * p.tasks_per_node > 1:  # one task failing ends the job, not a hang at a collective
            kw["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        return kw

    def group(self) -> str:
        """Jobs with equal groups can share one array."""
        return json.dumps(asdict(self.resolved()), sort_keys=True, default=list)


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """One SLURM command. Raises OSError when it is not installed, subprocess.TimeoutExpired after
    ``timeout`` seconds."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def partitions() -> dict[str, dict[str, Any]]:
    """Partitions this cluster has: name → {cpus (most per node), gpus (most per node), default}.
    Raises SlurmConfigError when sinfo fails, FileNotFoundError when it is not installed."""
    out = _run(["sinfo", "-h", "-o", "%P|%c|%G"])
    if out.returncode != 0:
        raise SlurmConfigError(f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}")
    return parse_sinfo(out.stdout)


def parse_sinfo(text: str) -> dict[str, dict[str, Any]]:
    """``sinfo -h -o '%P|%c|%G'`` → partitions (one line per partition and node configuration)."""
    parts: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        name, cpus, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = 0
        for item in gres.split(","):  # gpu:4, gpu:a100:8, gpu:8(S:0-1)
            bits = item.split("(")[0].split(":")
            if bits[0] == "gpu" and bits[-1].isdigit():
                gpus = max(gpus, int(bits[-1]))
        info = parts.setdefault(name, {"cpus": 0, "gpus": 0, "default": default})
        info["cpus"] = max(info["cpus"], int(cpus.rstrip("+")))
        info["gpus"] = max(info["gpus"], gpus)
    return parts


def check_params(label: str, params: SlurmParams, parts: dict[str, dict[str, Any]]) -> list[str]:
    """Problems that would make sbatch refuse the job, leave it pending forever, or make its processes
    fail at their first collective (more tasks than GPUs on a node with GPUs), each naming ``label``'s
    field (e.g. ``cluster.pretrain.partition``) and the fix; [] when it fits."""
    p = params.resolved()
    if p.partition is None:
        name = next((n for n, i in parts.items() if i["default"]), None)
        if name is None:
            return [f"{label}.partition: the cluster has no default partition; set one of {', '.join(parts)}"]
    elif p.partition not in parts:
        return [f"{label}.partition = {p.partition!r}: no such partition; this cluster has {', '.join(parts)}"]
    else:
        name = p.partition
    info, problems = parts[name], []
    if p.gpus_per_node > info["gpus"]:
        problems.append(f"{label}.gpus_per_node = {p.gpus_per_node}: partition {name!r} has "
                        f"{info['gpus']} GPUs per node; lower it or pick a partition with GPUs")
    if p.gpus_per_node and p.tasks_per_node > p.gpus_per_node:
        # NCCL refuses two ranks on one device, at the first collective: after the job waited in the queue
        problems.append(f"{label}.tasks_per_node = {p.tasks_per_node}: more than the job's {p.gpus_per_node} GPUs per "
                        f"node, and each process needs a GPU of its own (NCCL refuses two ranks on one device); set "
                        f"tasks_per_node to {p.gpus_per_node} or fewer, or gpus_per_node to {p.tasks_per_node}")
    if p.cpus_per_task * p.tasks_per_node > info["cpus"]:
        what = (f"cpus_per_task = {p.cpus_per_task}" if p.tasks_per_node == 1 else
                f"cpus_per_task × tasks_per_node = {p.cpus_per_task} × {p.tasks_per_node}")
        problems.append(f"{label}.{what}: partition {name!r} has {info['cpus']} CPUs per node; lower it")
    return problems


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of one job: squeue while it is queued or running, then scontrol (which keeps
    ended jobs for MinJobAge seconds). ("UNKNOWN", SLURM's message) when SLURM no longer knows it.
    Raises OSError when the commands are missing, subprocess.TimeoutExpired when they hang 30 s."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if out.returncode == 0 and out.stdout.strip():
        state, reason = out.stdout.strip().splitlines()[0].split("|", 1)
        return state, reason
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode == 0 and out.stdout.strip():
        fields_ = dict(kv.split("=", 1) for kv in shlex.split(out.stdout.strip().splitlines()[0]) if "=" in kv)
        return fields_.get("JobState", "UNKNOWN"), fields_.get("Reason", "")
    return "UNKNOWN", (out.stderr or out.stdout).strip()


def live_state(job_id: str) -> str | None:
    """The state of ``job_id`` while it is queued or running (one of ``LIVE``), else None; None too
    when SLURM cannot be asked (its commands missing or hanging)."""
    try:
        state = job_state(job_id)[0].split()[0]
    except (OSError, subprocess.SubprocessError):
        return None
    return state if state in LIVE else None


def current_job_id() -> str | None:
    """The SLURM job id of this process, as submitit and squeue spell it (``A_i`` for array tasks);
    None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def cancel(job_ids: Sequence[str]) -> subprocess.CompletedProcess:
    """``scancel`` the jobs; the caller reads returncode and stderr."""
    return _run(["scancel", *job_ids])

"""Run callables as SLURM jobs through submitit, with a local Ray DAG deciding the order.

The DAG is the same one the Ray backends run: one Ray task per callable, upstream results passed as
ObjectRefs. With this backend each of those tasks only waits: it asks a ``_Submitter`` actor to run
the callable on SLURM and blocks until the job ends. Both the waiting tasks and the actor ask Ray for
zero CPUs, so a grid of any width waits without holding a core of the submitting machine, and Ray
still never starts a task before its upstream tasks succeeded.

- Callables that become ready within ``window_s`` of each other with the same SLURM parameters go
  out as one job array (``executor.batch()``), at most ``array_parallelism`` running at once.
- Every job is wrapped in ``Resumable`` (a submitit ``Checkpointable``): on the USR2 that SLURM sends
  before a timeout or a preemption, submitit requeues it with the same arguments, and the callable
  resumes from whatever checkpoint it wrote.
- Without SLURM accounting, ``sacct`` fails and submitit cannot see a job that died without a result
  (submitit#1720). The watcher asks ``squeue`` for live jobs and ``scontrol show job`` for ended ones;
  a job that has left the queue without writing its result is a failure, reported with SLURM's state
  and reason, never a wait.
- Before submission, ``marker`` (a JSON file the caller names) gets ``{"state": "submitting"}``; once
  sbatch answers it gets the job id. A crash in between leaves a marker that says so (dora's orphan
  markers), and ``cancel`` uses the ids to scancel what is still queued.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import submitit
from submitit.core.utils import pickle_load

from cluster.ray_backend import RayBackend

ENDED_WITHOUT_RESULT = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                        "DEADLINE", "REVOKED", "SPECIAL_EXIT")


class SlurmConfigError(Exception):
    """The SLURM parameters cannot be satisfied by this cluster; nothing was submitted."""


@dataclass(frozen=True)
class SlurmParams:
    """One job's request. Field names follow submitit's (``slurm_`` prefix dropped)."""

    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # > 1: one process per task, with torch.distributed's env:// variables set
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    array_parallelism: int = 64
    signal_delay_s: int = 90

    def executor_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"timeout_min": self.timeout_min, "cpus_per_task": self.cpus_per_task,
                              "nodes": self.nodes, "tasks_per_node": self.tasks_per_node,
                              "slurm_array_parallelism": self.array_parallelism,
                              "slurm_signal_delay_s": self.signal_delay_s}
        if self.gpus_per_node:
            kw["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            kw["mem_gb"] = self.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                kw[f"slurm_{name}"] = getattr(self, name)
        if self.additional_parameters:
            kw["slurm_additional_parameters"] = dict(self.additional_parameters)
        if self.setup:
            kw["slurm_setup"] = list(self.setup)
        if self.nodes * self.tasks_per_node > 1:  # one task failing ends the job, not a hang at a collective
            kw["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        return kw

    def group(self) -> str:
        """Jobs with equal groups can share one array."""
        return json.dumps(asdict(self), sort_keys=True, default=list)


class Resumable(submitit.helpers.Checkpointable):
    """A callable that submitit requeues on timeout or preemption, with the same arguments. The
    callable itself must pick up its own checkpoint when it starts again.

    In a job of several tasks (nodes × tasks_per_node) every task calls it, after exporting
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (submitit's TorchDistributedEnvironment),
    so the callable can join a torch.distributed group with env://. Only task 0's result is read."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            dist_env = submitit.helpers.TorchDistributedEnvironment()
            if "MASTER_PORT" not in os.environ:  # a port the user exported is kept
                dist_env.master_port = shared_master_port()
            dist_env.export(set_cuda_visible_devices=False)
        return self.fn(*args)


def shared_master_port(timeout_s: float = 300.0) -> int:
    """A port that was free on the master node: global rank 0 (which runs there) asks the OS for one
    and writes it to a file in the job's folder, which every node sees (submitit needs that too);
    the other tasks read it. submitit's own choice, a hash of the job id, can name a port another
    process already holds: that happened in CI (rank 0 failed with EADDRINUSE). The file name
    carries SLURM_RESTART_COUNT, so a requeued job never reads its previous attempt's port."""
    env = submitit.JobEnvironment()
    path = env.paths.folder / f".master_port.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if env.global_rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(str(port))
        os.replace(tmp, path)
        return port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
    raise TimeoutError(f"{path}: global rank 0 did not publish the master port within {timeout_s:.0f} s")


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def partitions() -> dict[str, dict[str, Any]]:
    """Partitions this cluster has: name → {cpus (most per node), gpus (most per node), default}."""
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


def check_params(label: str, p: SlurmParams, parts: dict[str, dict[str, Any]]) -> list[str]:
    """Problems that would make sbatch refuse the job or leave it pending forever."""
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
    if p.cpus_per_task * p.tasks_per_node > info["cpus"]:
        what = (f"cpus_per_task = {p.cpus_per_task}" if p.tasks_per_node == 1 else
                f"cpus_per_task × tasks_per_node = {p.cpus_per_task} × {p.tasks_per_node}")
        problems.append(f"{label}.{what}: partition {name!r} has {info['cpus']} CPUs per node; lower it")
    return problems


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of one job: squeue while it is queued or running, then scontrol (which keeps
    ended jobs for MinJobAge seconds). ("UNKNOWN", ...) when SLURM no longer knows it."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
    if out.returncode == 0 and out.stdout.strip():
        state, reason = out.stdout.strip().splitlines()[0].split("|", 1)
        return state, reason
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode == 0 and out.stdout.strip():
        fields = dict(kv.split("=", 1) for kv in shlex.split(out.stdout.strip().splitlines()[0]) if "=" in kv)
        return fields.get("JobState", "UNKNOWN"), fields.get("Reason", "")
    return "UNKNOWN", (out.stderr or out.stdout).strip()


def current_job_id() -> str | None:
    """The SLURM job id of this process, as submitit and squeue spell it (``A_i`` for array tasks)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def cancel(job_ids: Sequence[str]) -> subprocess.CompletedProcess:
    return _run(["scancel", *job_ids])


def write_marker(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class _Submitter:
    """The one actor that talks to SLURM: batches submissions into arrays and watches the jobs."""

    def __init__(self, folder: str, window_s: float, poll_s: float, lost_grace_s: float, env: dict[str, str],
                 code_dir: str | None = None):
        os.environ.update(env)  # SLURM_CONF and friends, for sbatch/squeue called from here
        self.folder, self.window_s, self.poll_s, self.lost_grace_s = folder, window_s, poll_s, lost_grace_s
        self.code_dir = code_dir
        self.queue: list[tuple] = []
        self.flusher: asyncio.Task | None = None

    async def run(self, fn: Callable, args: list, params: SlurmParams, name: str, marker: str) -> tuple:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((fn, args, params, name, Path(marker), fut))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush_later())
        try:
            job = await fut
        except Exception as err:  # sbatch refused the whole array
            return False, f"SLURM refused the job: {err}", None
        return await self._watch(job)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.window_s)
        batch, self.queue = self.queue, []
        groups: dict[str, list[tuple]] = {}
        for item in batch:
            groups.setdefault(item[2].group(), []).append(item)
        for items in groups.values():
            try:
                jobs = await asyncio.to_thread(self._submit, items)
            except Exception as err:
                for *_, fut in items:
                    fut.set_exception(RuntimeError(str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)))
                continue
            for item, job in zip(items, jobs):
                item[5].set_result(job)

    def _submit(self, items: list[tuple]) -> list[submitit.Job]:
        params: SlurmParams = items[0][2]
        ex = submitit.AutoExecutor(folder=os.path.join(self.folder, "%j"), cluster="slurm")
        kw = params.executor_kwargs()
        if self.code_dir is not None:  # `python -m submitit...` puts the job's cwd first on sys.path
            kw["slurm_additional_parameters"] = {**kw.get("slurm_additional_parameters", {}), "chdir": self.code_dir}
        ex.update_parameters(name=items[0][3] if len(items) == 1 else f"sslgrid[{len(items)}]", **kw)
        for *_, marker, _fut in items:
            write_marker(marker, {"state": "submitting", "since": time.time()})
        jobs = []
        with ex.batch():
            for fn, args, *_ in items:
                jobs.append(ex.submit(Resumable(fn), *args))
        for (*_, marker, _fut), job in zip(items, jobs):
            write_marker(marker, {"state": "submitted", "job_id": str(job.job_id), "since": time.time(),
                                  "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})
        return jobs

    async def _watch(self, job: submitit.Job) -> tuple:
        gone_since = None
        while True:
            if job.paths.result_pickle.exists():
                outcome, value = pickle_load(job.paths.result_pickle)
                if outcome == "success":
                    return True, value, job.job_id
                return False, str(value).strip().splitlines()[-1], job.job_id
            state, reason = await asyncio.to_thread(job_state, str(job.job_id))
            base = state.split()[0].rstrip("+")
            if base in ENDED_WITHOUT_RESULT or base in ("COMPLETED", "UNKNOWN"):
                # the result file may trail the state by a moment on a network file system
                gone_since = gone_since or time.time()
                if time.time() - gone_since > self.lost_grace_s:
                    why = f" ({reason})" if reason and reason != "None" else ""
                    return False, (f"SLURM job {job.job_id} ended {base}{why} without a result; "
                                   f"its log: {job.paths.stderr}"), job.job_id
            else:
                gone_since = None
            await asyncio.sleep(self.poll_s)


def _wait_on_slurm(submitter: Any, fn: Callable, params: SlurmParams, name: str, marker: str, *args: Any) -> Any:
    ok, value, job_id = ray.get(submitter.run.remote(fn, list(args), params, name, marker))
    if not ok:
        raise SlurmJobError(value)
    return value


class SlurmJobError(Exception):
    """A stage's SLURM job failed, was cancelled, or vanished; the message says which and why."""


class SlurmBackend(RayBackend):
    """``submit`` runs ``fn`` in a SLURM job; ``params_for(name)`` gives each task's SLURM request and
    ``marker_for(name)`` the marker file it keeps."""

    def __init__(self, folder: Path, params_for: Callable[[str], SlurmParams], marker_for: Callable[[str], Path],
                 env_vars: dict[str, str] | None = None, window_s: float = 1.0, poll_s: float = 2.0,
                 lost_grace_s: float = 10.0, code_dir: str | os.PathLike | None = None):
        """``code_dir`` (on the shared filesystem): the jobs start there, so they import its packages."""
        super().__init__(None, env_vars=env_vars, code_dir=code_dir)
        self.folder, self.params_for, self.marker_for = Path(folder), params_for, marker_for
        self.window_s, self.poll_s, self.lost_grace_s = window_s, poll_s, lost_grace_s
        self.submitter: Any = None

    def __enter__(self) -> SlurmBackend:
        super().__enter__()
        env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF")} | self.env_vars
        actor = ray.remote(num_cpus=0, max_concurrency=10_000)(_Submitter)
        self.submitter = actor.remote(str(self.folder), self.window_s, self.poll_s, self.lost_grace_s, env,
                                      None if self.code_dir is None else str(self.code_dir))
        return self

    def resources(self) -> dict[str, float]:
        return {"CPU": float("inf"), "GPU": float(max((p["gpus"] for p in partitions().values()), default=0))}

    def check_fits(self, label: str, cpus: float, gpus: float) -> None:
        """SLURM requests are checked against ``sinfo`` before the run (``check_params``)."""

    def submit(self, fn: Callable, args: Sequence[Any], *, name: str, cpus: float, gpus: float,
               retries: int = 0, processes: int = 1) -> ray.ObjectRef:
        """``cpus``/``gpus``/``processes`` are the Ray request; the SLURM one is ``params_for(name)``."""
        if _wait_on_slurm not in self._remote:
            self._remote[_wait_on_slurm] = ray.remote(_wait_on_slurm)
        task = self._remote[_wait_on_slurm].options(num_cpus=0, num_gpus=0, name=name, max_retries=retries,
                                                    retry_exceptions=False)
        return task.remote(self.submitter, fn, self.params_for(name), name, str(self.marker_for(name)), *args)

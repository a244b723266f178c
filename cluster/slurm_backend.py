"""Run callables as SLURM jobs through submitit, with a local Ray DAG deciding the order.

``SlurmBackend`` implements the ``Backend`` protocol (cluster/backend.py) by composing a
``RayBackend``: the DAG is the same one the Ray backends run, one Ray task per callable, upstream
results passed as ObjectRefs. Here each of those tasks only waits: it asks a ``_Submitter`` actor to
run the callable on SLURM and blocks until the job ends. Both the waiting tasks and the actor ask Ray
for zero CPUs, so a grid of any width waits without holding a core of the submitting machine, and
Ray still never starts a task before its upstream tasks succeeded.

- Callables that become ready within ``window_s`` of each other with the same SLURM parameters go
  out as one job array (``executor.batch()``), at most ``array_parallelism`` running at once.
- Every job is wrapped in ``Resumable`` (a submitit ``Checkpointable``): on the USR2 that SLURM sends
  before a timeout or a preemption, submitit requeues it with the same arguments, and the callable
  resumes from whatever checkpoint it wrote.
- Requests are ``SlurmParams`` (cluster/slurm_jobs.py, every parameter declared once there).
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
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import submitit
from submitit.core.utils import pickle_load

from cluster.backend import Handle
from cluster.ray_backend import RayBackend
from cluster.slurm_jobs import ENDED_WITHOUT_RESULT, SlurmParams, job_state, partitions
from trainers.files import write_text  # standard library only: the one temp-then-rename


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
        write_text(path, str(port))
        return port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
    raise TimeoutError(f"{path}: global rank 0 did not publish the master port within {timeout_s:.0f} s")


def write_marker(path: Path, data: dict[str, Any]) -> None:
    """The job's marker (dora's orphan marker: written at submission, then with the job id), atomically."""
    write_text(path, json.dumps(data, indent=1))


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
        """(ok, return value or error line, job id) once the job wrote its result, or once it has been
        out of SLURM's queue (ended, cancelled, forgotten) for ``lost_grace_s`` seconds without one.
        Pending, running and requeued jobs are waited on, however long."""
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


class SlurmBackend:
    """``submit`` runs ``fn`` in a SLURM job; ``params_for(name)`` gives each task's SLURM request and
    ``marker_for(name)`` the marker file it keeps. The order comes from ``dag``, a private local
    ``RayBackend`` whose tasks wait on the jobs."""

    def __init__(self, folder: Path, params_for: Callable[[str], SlurmParams], marker_for: Callable[[str], Path],
                 env_vars: dict[str, str] | None = None, window_s: float = 1.0, poll_s: float = 2.0,
                 lost_grace_s: float = 10.0, code_dir: str | os.PathLike | None = None):
        """``folder``: submitit's job folders (on the shared filesystem). ``window_s``: how long a ready
        task waits for others to share its job array; ``poll_s``: seconds between looks at a job;
        ``lost_grace_s``: how long a job may be gone from the queue before its result file appears.
        ``code_dir`` (on the shared filesystem): the jobs start there, so they import its packages."""
        self.dag = RayBackend(None, env_vars=env_vars, code_dir=code_dir)
        self.folder, self.params_for, self.marker_for = Path(folder), params_for, marker_for
        self.env_vars, self.code_dir = dict(env_vars or {}), code_dir
        self.window_s, self.poll_s, self.lost_grace_s = window_s, poll_s, lost_grace_s
        self.submitter: Any = None

    def __enter__(self) -> SlurmBackend:
        self.dag.__enter__()
        try:
            env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_CONF")} | self.env_vars
            actor = ray.remote(num_cpus=0, max_concurrency=10_000)(_Submitter)
            self.submitter = actor.remote(str(self.folder), self.window_s, self.poll_s, self.lost_grace_s, env,
                                          None if self.code_dir is None else str(self.code_dir))
        except BaseException:
            self.dag.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.dag.__exit__(*exc)

    def resources(self) -> dict[str, float]:
        """CPUs unbounded (jobs queue); GPUs: the most that one node of any partition has (``sinfo``)."""
        return {"CPU": float("inf"), "GPU": float(max((p["gpus"] for p in partitions().values()), default=0))}

    def check_fits(self, label: str, cpus: float, gpus: float) -> None:
        """SLURM requests are checked against ``sinfo`` before the run (``check_params``)."""

    def submit(self, fn: Callable, args: Sequence[Any], *, name: str, cpus: float, gpus: float,
               retries: int = 0, processes: int = 1) -> Handle:
        """``cpus``/``gpus``/``processes`` are the Ray request; the SLURM one is ``params_for(name)``.
        The waiting Ray task asks for nothing; ``retries`` retries it if its worker crashes."""
        return self.dag.submit(_wait_on_slurm, [self.submitter, fn, self.params_for(name), name,
                                                str(self.marker_for(name)), *args],
                               name=name, cpus=0, gpus=0, retries=retries)

    def wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        return self.dag.wait(handles, timeout)

    def outcome(self, handle: Handle) -> tuple[bool, Any]:
        return self.dag.outcome(handle)

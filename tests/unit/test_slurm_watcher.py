"""The SLURM submitter and job watcher (cluster/slurm_backend.py ``_Submitter``) and SLURM's queries
(cluster/slurm_jobs.py) against a fake SLURM at the subprocess boundary (tests/unit/fake_slurm.py):
real submitit scripts and pickles, jobs run by submitit's own job-side code, no SLURM needed.
tests/integration/test_slurm.py runs the same code on a real slurmctld."""
from __future__ import annotations

import asyncio
import json
import operator
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.slurm_backend import SlurmBackend, _Submitter
from cluster.slurm_jobs import SlurmParams, cancel, current_job_id, job_state, live_state, parse_sinfo, partitions
from tests.unit.fake_slurm import SINFO, FakeSlurm

GRACE_S = 0.5  # how long a job may be out of the queue before its result file appears


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> FakeSlurm:
    return FakeSlurm(tmp_path / "fake").install(monkeypatch)


def submitter(tmp_path: Path, grace_s: float = GRACE_S) -> _Submitter:
    """The actor's class, used directly: its coroutines need an event loop, not Ray."""
    return _Submitter(str(tmp_path / "jobs"), window_s=0.1, poll_s=0.02, lost_grace_s=grace_s, env={})


def marker(tmp_path: Path, name: str = "stage") -> Path:
    return tmp_path / name / "slurm.json"


async def until(check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return value


async def job_of(path: Path) -> str:
    """The job id the submitter wrote into the marker at ``path``, once it is there."""
    def read() -> str | None:
        try:
            return json.loads(path.read_text()).get("job_id")
        except (OSError, json.JSONDecodeError):
            return None
    return await until(read)


def test_jobs_ready_together_share_one_array_and_return_their_values(tmp_path, slurm):
    sub = submitter(tmp_path)
    debug, gpu = SlurmParams(partition="debug", timeout_min=5), SlurmParams(partition="gpu", gpus_per_node=1)
    a, b, c = marker(tmp_path, "a"), marker(tmp_path, "b"), marker(tmp_path, "c")

    async def scenario() -> tuple[list[str], list[tuple]]:
        runs = [asyncio.create_task(sub.run(operator.add, [2, 3], debug, "pretrain:a", str(a))),
                asyncio.create_task(sub.run(operator.add, [4, 5], debug, "pretrain:b", str(b))),
                asyncio.create_task(sub.run(operator.mul, [4, 5], gpu, "pretrain:c", str(c)))]
        ids = [await job_of(m) for m in (a, b, c)]
        for job in ids:
            assert (await asyncio.to_thread(slurm.run_job, job)).returncode == 0
        return ids, list(await asyncio.gather(*runs))

    ids, results = asyncio.run(scenario())
    array = ids[0].split("_")[0]
    assert ids[:2] == [f"{array}_0", f"{array}_1"] and "_" not in ids[2]
    assert results == [(True, 5, ids[0]), (True, 9, ids[1]), (True, 20, ids[2])]
    assert len(slurm.calls("sbatch")) == 2  # one array for the equal requests, one job for the other
    script = slurm.jobs()[ids[0]]["script"]
    for line in ("--array=0-1%2", "--partition=debug", "--time=5", "--signal=USR2@90", "--cpus-per-task=1"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "#SBATCH --gpus-per-node=1\n" in slurm.jobs()[ids[2]]["script"]
    data = json.loads(a.read_text())
    assert data["state"] == "submitted" and data["job_id"] == ids[0] and data["stderr"].endswith(f"{ids[0]}_0_log.err")


def test_a_job_that_raises_reports_its_own_error(tmp_path, slurm):
    sub = submitter(tmp_path)

    async def scenario() -> tuple[str, tuple]:
        task = asyncio.create_task(sub.run(operator.truediv, [1, 0], SlurmParams(), "probe:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        assert (await asyncio.to_thread(slurm.run_job, job)).returncode != 0
        return job, await task

    job, result = asyncio.run(scenario())
    assert result == (False, "ZeroDivisionError: division by zero", job)


@pytest.mark.parametrize("state, reason, said", [("NODE_FAIL", "NodeDown", "NODE_FAIL (NodeDown)"),
                                                 ("OUT_OF_MEMORY", "OutOfMemory", "OUT_OF_MEMORY (OutOfMemory)"),
                                                 ("TIMEOUT", "TimeLimit", "TIMEOUT (TimeLimit)")])
def test_a_job_that_ends_without_a_result_fails_with_slurms_state_and_reason(tmp_path, slurm, state, reason, said):
    sub = submitter(tmp_path)

    async def scenario() -> tuple[str, tuple, float]:
        task = asyncio.create_task(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        slurm.set_state(job, "RUNNING")
        await asyncio.sleep(0.2)
        assert not task.done()
        slurm.set_state(job, state, reason)
        t0 = time.monotonic()
        result = await task
        return job, result, time.monotonic() - t0

    job, result, waited = asyncio.run(scenario())
    log = json.loads(marker(tmp_path).read_text())["stderr"]
    assert result == (False, f"SLURM job {job} ended {said} without a result; its log: {log}", job)
    assert waited >= GRACE_S  # the result file may trail the state on a network file system


def test_a_result_that_trails_the_end_of_its_job_is_still_read(tmp_path, slurm):
    sub = submitter(tmp_path, grace_s=60)

    async def scenario() -> tuple[str, tuple]:
        task = asyncio.create_task(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        slurm.set_state(job, "COMPLETED")  # gone from the queue; the result file is not there yet
        await asyncio.sleep(0.3)
        assert not task.done()
        assert (await asyncio.to_thread(slurm.run_job, job, report=False)).returncode == 0
        return job, await task

    job, result = asyncio.run(scenario())
    assert result == (True, 2, job)


def test_a_job_slurm_forgot_is_a_failure_not_a_wait(tmp_path, slurm):
    sub = submitter(tmp_path)

    async def scenario() -> tuple[str, tuple]:
        task = asyncio.create_task(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        slurm.forget(job)  # e.g. slurmctld restarted without its state: squeue and scontrol both refuse it
        return job, await task

    job, result = asyncio.run(scenario())
    assert result[0] is False and result[2] == job
    assert result[1].startswith(f"SLURM job {job} ended UNKNOWN (slurm_load_jobs error: Invalid job id specified) "
                                f"without a result")


def test_a_requeued_job_is_waited_for_and_its_new_run_read(tmp_path, slurm):
    sub = submitter(tmp_path)

    async def scenario() -> tuple[str, tuple]:
        task = asyncio.create_task(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        slurm.set_state(job, "RUNNING")
        subprocess.run(["scontrol", "requeue", job], check=True)  # what submitit runs on USR2
        await asyncio.sleep(3 * GRACE_S)
        assert not task.done()  # held back (PENDING, BeginTime): requeued, not lost
        assert await asyncio.to_thread(job_state, job) == ("PENDING", "BeginTime")
        assert (await asyncio.to_thread(slurm.run_job, job, 1)).returncode == 0
        return job, await task

    job, result = asyncio.run(scenario())
    assert result == (True, 2, job)  # the same job id across the requeue
    assert json.loads(marker(tmp_path).read_text())["job_id"] == job


def test_cancel_ends_the_watch_with_the_job_cancelled(tmp_path, slurm):
    sub = submitter(tmp_path)

    async def scenario() -> tuple[str, tuple]:
        task = asyncio.create_task(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:x", str(marker(tmp_path))))
        job = await job_of(marker(tmp_path))
        assert (await asyncio.to_thread(cancel, [job])).returncode == 0
        return job, await task

    job, result = asyncio.run(scenario())
    assert slurm.calls("scancel") == [["scancel", job]]
    assert result[0] is False and result[1].startswith(f"SLURM job {job} ended CANCELLED without a result; its log: ")


def test_a_refused_submission_fails_every_job_of_its_array_and_leaves_orphan_markers(tmp_path, slurm):
    sub = submitter(tmp_path)
    slurm.refuse("sbatch: error: Batch job submission failed: Invalid partition name specified")
    a, b = marker(tmp_path, "a"), marker(tmp_path, "b")

    async def scenario() -> list[tuple]:
        return list(await asyncio.gather(sub.run(operator.add, [1, 1], SlurmParams(), "pretrain:a", str(a)),
                                         sub.run(operator.add, [2, 2], SlurmParams(), "pretrain:b", str(b))))

    results = asyncio.run(scenario())
    for ok, message, job in results:
        assert (ok, job) == (False, None) and message.startswith("SLURM refused the job: ")
        assert "Invalid partition name specified" in message, message
    for m in (a, b):  # submission started and never got a job id: a crash here would say so too
        assert json.loads(m.read_text())["state"] == "submitting"
    assert slurm.jobs() == {}


def test_job_state_asks_squeue_then_scontrol(slurm, monkeypatch):
    slurm.add("7", "RUNNING")
    slurm.add("8", "TIMEOUT", "TimeLimit")
    assert job_state("7") == ("RUNNING", "None") and live_state("7") == "RUNNING"
    assert job_state("8") == ("TIMEOUT", "TimeLimit") and live_state("8") is None
    assert job_state("9") == ("UNKNOWN", "slurm_load_jobs error: Invalid job id specified")
    # a queued job: squeue alone; an ended one: squeue, then scontrol
    assert [c[0] for c in slurm.calls()][:4] == ["squeue", "squeue", "squeue", "scontrol"]
    assert partitions() == parse_sinfo(SINFO)
    assert SlurmBackend(Path("jobs"), lambda name: SlurmParams(), lambda name: Path()).resources() == \
        {"CPU": float("inf"), "GPU": 2.0}
    monkeypatch.setenv("PATH", str(slurm.root / "nothing"))  # no SLURM on this machine
    with pytest.raises(FileNotFoundError):
        job_state("7")
    assert live_state("7") is None


def test_current_job_id_names_array_tasks_as_squeue_does(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert current_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert current_job_id() == "42"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert current_job_id() == "40_1"

"""A fake SLURM at the subprocess boundary, as submitit's own tests fake ``sbatch``/``sacct``: small
executables (sbatch, squeue, scontrol, scancel, sinfo, srun) that keep the queue in a JSON file,
put first on the PATH by ``FakeSlurm.install``. The code under test runs unchanged: submitit
writes real sbatch scripts and pickles, and ``FakeSlurm.run_job`` runs a job through submitit's own
job-side entry point, as srun would on a node.

The test plays the scheduler: it moves jobs between states (``set_state``), forgets them
(``forget``, SLURM's MinJobAge passing), and runs them (``run_job``).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
QUEUED = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED", "COMPLETING")
SINFO = "debug*|2|(null)\ngpu|8|gpu:2\n"


class FakeSlurm:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state = self.root / "queue.json"

    def install(self, monkeypatch: Any) -> FakeSlurm:
        """Writes the executables and puts them first on the PATH (for this test only)."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True)
        for tool in TOOLS:
            exe = bin_dir / tool
            exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {tool} "
                           f"{shlex.quote(str(self.root))} \"$@\"\n")
            exe.chmod(0o755)
        self._save({"next": 1000, "jobs": {}, "calls": []})
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return self

    # ---- the scheduler's side, for the test

    def calls(self, tool: str | None = None) -> list[list[str]]:
        """Every command the code under test ran, as argv lists (tool first)."""
        return [c for c in self._load()["calls"] if tool is None or c[0] == tool]

    def jobs(self) -> dict[str, dict]:
        return self._load()["jobs"]

    def add(self, job_id: str, state: str, reason: str = "None") -> None:
        """A job that was submitted some other way (another driver, by hand)."""
        with self._edit() as q:
            q["jobs"][job_id] = {"state": state, "reason": reason}

    def set_state(self, job_id: str, state: str, reason: str = "None") -> None:
        with self._edit() as q:
            q["jobs"][job_id].update(state=state, reason=reason)

    def forget(self, job_id: str) -> None:
        """SLURM no longer knows the job (MinJobAge passed, or slurmctld lost its state)."""
        with self._edit() as q:
            q["jobs"][job_id]["forgotten"] = True

    def refuse(self, message: str) -> None:
        """The next sbatch fails with ``message`` on stderr."""
        (self.root / "refuse").write_text(message)

    def run_job(self, job_id: str, restart: int = 0, report: bool = True) -> subprocess.CompletedProcess:
        """Runs the job as srun would on a node: submitit's job-side entry point with SLURM's
        variables (``restart``: SLURM_RESTART_COUNT). With ``report`` the queue says RUNNING
        meanwhile, then COMPLETED or FAILED by the exit code; without, the queue is left alone."""
        job = self.jobs()[job_id]
        env = dict(os.environ, PYTHONPATH=str(REPO), SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=job["unique_id"],
                   SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NODEID="0",
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT=str(restart))
        if "_" in job_id:
            env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"] = job_id.split("_")
        if report:
            self.set_state(job_id, "RUNNING")
        out = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", job["folder"]], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        if report:
            self.set_state(job_id, "COMPLETED" if out.returncode == 0 else "FAILED",
                           "None" if out.returncode == 0 else "NonZeroExitCode")
        return out

    # ---- the queue file

    def _load(self) -> dict:
        return json.loads(self.state.read_text())

    def _save(self, q: dict) -> None:
        tmp = self.state.with_name(f".{self.state.name}.{os.getpid()}")
        tmp.write_text(json.dumps(q))
        os.replace(tmp, self.state)

    @contextmanager
    def _edit(self) -> Iterator[dict]:
        with open(self.root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            q = self._load()
            yield q
            self._save(q)


# ---- the executables' side


def _sbatch(fake: FakeSlurm, q: dict, args: list[str]) -> int:
    refuse = fake.root / "refuse"
    if refuse.exists():
        print(refuse.read_text(), file=sys.stderr)
        refuse.unlink()
        return 1
    script = Path(args[-1]).read_text()  # submitit moves the file into the job's folder afterwards
    array = re.search(r"^#SBATCH --array=0-(\d+)%\d+$", script, re.M)
    command = next(line for line in script.splitlines() if "submitit.core._submit" in line)
    base = str(q["next"])
    q["next"] += 10
    ids = [f"{base}_{i}" for i in range(int(array.group(1)) + 1)] if array else [base]
    for n, job_id in enumerate(ids):
        q["jobs"][job_id] = {"state": "PENDING", "reason": "Priority", "folder": shlex.split(command)[-1],
                             "script": script,
                             "unique_id": str(int(base) + n + 1 if array else int(base))}
    print(f"Submitted batch job {base}")
    return 0


def _squeue(q: dict, args: list[str]) -> int:
    job = q["jobs"].get(args[args.index("-j") + 1])
    if job is None or job.get("forgotten"):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    if job["state"] in QUEUED:
        print(f"{job['state']}|{job['reason']}")
    return 0


def _scontrol(q: dict, args: list[str]) -> int:
    job_id = args[-1]
    job = q["jobs"].get(job_id)
    if job is None or job.get("forgotten"):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    if args[0] == "requeue":  # SLURM holds a requeued job back until its begin time
        job.update(state="PENDING", reason="BeginTime")
        return 0
    print(f"JobId={job_id} JobName=sslgrid JobState={job['state']} Reason={job['reason']} Dependency=(null)")
    return 0


def _scancel(q: dict, args: list[str]) -> int:
    for job_id in args:
        if job_id in q["jobs"]:
            q["jobs"][job_id].update(state="CANCELLED", reason="None")
    return 0


def main(tool: str, root: str, args: list[str]) -> int:
    fake = FakeSlurm(Path(root))
    with fake._edit() as q:
        q["calls"].append([tool, *args])
        if tool == "sbatch":
            return _sbatch(fake, q, args)
        if tool == "squeue":
            return _squeue(q, args)
        if tool == "scontrol":
            return _scontrol(q, args)
        if tool == "scancel":
            return _scancel(q, args)
        if tool == "sinfo":
            print(SINFO, end="")
            return 0
    print(f"fake SLURM: {tool} is not faked", file=sys.stderr)  # srun: only looked for on the PATH
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))

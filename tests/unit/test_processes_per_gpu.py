"""One process per GPU at most (issue 19): ``resources: {gpus: 1, processes: 2}`` was accepted, and
NCCL then refused two ranks on one device at the first collective, after launch (after the queue, on
SLURM). Now it is refused before anything runs, with exit 2, naming the file, the field and the fix:
at load when ``gpus`` is written; when the grid runs for ``gpus`` left unset (resolved to the
backend's 1 GPU); and in the SLURM request (``tasks_per_node`` above ``gpus_per_node``)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from cluster.inprocess import InProcessBackend
from cluster.slurm_jobs import SlurmParams, check_params, parse_sinfo
from pipeline.backends import BackendError
from pipeline.cli import main
from pipeline.grid import GridError, load_grid

GRID = """name: g
defaults:
  dataset: {{name: synthetic, num_train: 96, num_val: 48, image_size: 32}}
  backbone: {{name: tiny_resnet, bn_splits: 2}}
  pretrain: {{method: mocov2, epochs: 1, batch_size: 32, K: 32}}
evaluations: [linear_probe]
resources:
  pretrain: {resources}
"""


def grid(tmp_path: Path, resources: str) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(resources=resources))
    return path


def test_more_processes_than_gpus_is_refused_at_load_with_exit_2(tmp_path, capsys, monkeypatch):
    path = grid(tmp_path, "{cpus: 2, gpus: 1, processes: 2}")
    monkeypatch.chdir(tmp_path)
    for command in (["plan", str(path)], ["run", str(path), "--workdir", str(tmp_path / "wd")]):
        assert main(command) == 2
        out = capsys.readouterr()
        text = " ".join((out.out + out.err).split())  # rich wraps long lines
        assert f"{path}: resources.pretrain.processes = 2: more processes than the stage's 1 GPU;" in text, text
        assert ("Set processes to 1, raise resources.pretrain.gpus to 2, or set resources.pretrain.gpus "
                "to 0 to run the 2 processes on CPUs") in text, text
    assert not (tmp_path / "wd").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("resources", ["{gpus: 0, processes: 2}", "{gpus: 8, processes: 2}", "{gpus: 2, processes: 2}",
                                       "{gpus: 0.5}", "{gpus: 0.5, processes: 1}", "{processes: 2}"])
def test_processes_that_each_have_a_gpu_or_none_are_accepted(tmp_path, resources):
    load_grid(grid(tmp_path, resources))


def test_gpus_that_do_not_split_into_whole_gpus_per_process_are_refused(tmp_path, capsys):
    with pytest.raises(GridError, match=r"resources.pretrain.gpus = 8: cannot be shared by the 3 processes \(2.67 GPUs "
                                        r"each\): each process gets whole GPUs; set resources.pretrain.gpus to a "
                                        r"multiple of 3 \(6 or 9, 2 GPUs or 3 per process\), or "
                                        r"resources.pretrain.processes to 2 or 4 or 8 \(dividing 8\)"):
        load_grid(grid(tmp_path, "{gpus: 8, processes: 3}"))
    # one process on 1.5 GPUs: not "set processes to 1" (it is 1), nor "1 GPUs" or "3.0"
    path = grid(tmp_path, "{gpus: 1.5, processes: 1}")
    assert main(["plan", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{path}: resources.pretrain.gpus = 1.5: one process gets a fraction of one GPU or whole GPUs, not 1.5 "
            f"GPUs: set resources.pretrain.gpus to 1 or 2, or below 1 to share a GPU") in err, err
    assert "processes to 1" not in err


def test_unset_gpus_resolved_to_one_gpu_cannot_hold_two_processes(tmp_path):
    """``gpus`` unset means 1 GPU on a backend that has one: refused before any stage is submitted."""
    from pipeline.execute import execute
    from pipeline.plan import build_plan
    from pipeline.tracking import prepare_runs

    path = grid(tmp_path, "{cpus: 2, processes: 2}")
    plan = build_plan(load_grid(path, workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"))
    run_ids = prepare_runs(plan)[2]
    backend = InProcessBackend(cpus=4, gpus=1)
    with pytest.raises(BackendError) as info:
        execute(plan, run_ids, lambda: backend, Console(file=io.StringIO()))
    text = str(info.value)
    assert text.startswith(f"{path}: resources.pretrain.gpus is unset, which means 1 GPU on this backend, but "
                           f"resources.pretrain.processes is 2"), text
    assert "Set resources.pretrain.gpus to 2, or to 0 to run the processes on CPUs" in text
    assert backend.submitted == []


SINFO = "debug*|2|(null)\ngpu|64|gpu:a100:8(S:0-1)\n"


@pytest.mark.parametrize("params, ok", [
    (SlurmParams(partition="gpu", gpus_per_node=2, tasks_per_node=4), False),
    (SlurmParams(partition="gpu", gpus_per_node=8, tasks_per_node=8), True),
    (SlurmParams(partition="gpu", gpus_per_node=8, tasks_per_node=2), True),
    (SlurmParams(partition="debug", gpus_per_node=0, tasks_per_node=2), True),
])
def test_a_slurm_job_gets_no_more_tasks_than_gpus_per_node(params, ok):
    problems = check_params("cluster.pretrain", params, parse_sinfo(SINFO))
    assert (problems == []) == ok, problems
    if not ok:
        assert problems == ["cluster.pretrain.tasks_per_node = 4: more than the job's 2 GPUs per node, and each "
                            "process needs a GPU of its own (NCCL refuses two ranks on one device); set "
                            "tasks_per_node to 2 or fewer, or gpus_per_node to 4"]


@pytest.mark.parametrize("over, message", [
    (["-o", "cluster.pretrain.tasks_per_node=2", "-o", "cluster.pretrain.gpus_per_node=1"],
     "cluster.pretrain.tasks_per_node = 2: more than the job's 1 GPUs per node"),
    # gpus unset on a GPU partition: 1 GPU per node, and 2 processes make 2 tasks
    (["-o", "resources.pretrain.processes=2", "-o", "resources.pretrain.cpus=2"],
     "cluster.pretrain.tasks_per_node = 2: more than the job's 1 GPUs per node"),
])
def test_sslgrid_run_on_slurm_refuses_more_tasks_than_gpus(tmp_path, monkeypatch, capsys, over, message):
    from tests.unit.fake_slurm import FakeSlurm

    fake = FakeSlurm(tmp_path / "fake").install(monkeypatch)  # sinfo: a partition "gpu" with 2 GPUs per node
    path = grid(tmp_path, "{cpus: 1}")
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(path), "--backend", "slurm", "--tracking-uri", "http://127.0.0.1:5999", "--workdir",
                 str(tmp_path / "wd"), "-o", "cluster.pretrain.partition=gpu", *over])
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert code == 2, text
    assert f"{path}: " in text and message in text and "Nothing was submitted" in text, text
    assert fake.calls("sbatch") == []

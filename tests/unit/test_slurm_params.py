"""The grid's cluster: section → SLURM requests, checked against sinfo before anything is submitted."""
from __future__ import annotations

import pytest

from cluster.slurm_backend import Resumable
from cluster.slurm_jobs import SlurmParams, check_params, parse_sinfo
from pipeline.backends import remote_tracking_problem
from pipeline.grid import GridError, load_grid
from pipeline.slurm import slurm_params

SINFO = "debug*|2|(null)\ngpu|64|gpu:a100:8(S:0-1)\ngpu|32|gpu:4\n"


def grid(tmp_path, cluster: str, resources: str = "") -> object:
    p = tmp_path / "g.yaml"
    p.write_text(f"name: g\ndefaults: {{dataset: {{name: synthetic}}, pretrain: {{K: 64}}}}\n{resources}\ncluster:\n{cluster}")
    return load_grid(p, workdir=str(tmp_path / "runs"), tracking_uri="http://127.0.0.1:1")


def test_parse_sinfo_takes_the_largest_node_of_each_partition():
    parts = parse_sinfo(SINFO)
    assert parts == {"debug": {"cpus": 2, "gpus": 0, "default": True}, "gpu": {"cpus": 64, "gpus": 8, "default": False}}


def test_kind_overrides_default_which_overrides_resources(tmp_path):
    g = grid(tmp_path, "  default: {partition: gpu, timeout_min: 30, mem_gb: 16, setup: ['module load cuda']}\n"
                       "  pretrain: {gpus_per_node: 8, timeout_min: 4320}\n",
             "resources:\n  linear_probe: {cpus: 3, gpus: 0}")
    parts = parse_sinfo(SINFO)
    pre, probe = slurm_params(g, "pretrain", parts), slurm_params(g, "linear_probe", parts)
    assert (pre.partition, pre.gpus_per_node, pre.timeout_min, pre.mem_gb) == ("gpu", 8, 4320, 16.0)
    assert pre.cpus_per_task == 1 and pre.setup == ("module load cuda",)
    assert (probe.partition, probe.gpus_per_node, probe.cpus_per_task, probe.timeout_min) == ("gpu", 0, 3, 30)
    kw = pre.executor_kwargs()
    assert kw["slurm_partition"] == "gpu" and kw["gpus_per_node"] == 8 and kw["slurm_setup"] == ["module load cuda"]


def test_gpus_default_to_one_on_a_gpu_partition_and_none_on_a_cpu_one(tmp_path):
    parts = parse_sinfo(SINFO)
    assert slurm_params(grid(tmp_path, "  default: {partition: gpu}\n"), "pretrain", parts).gpus_per_node == 1
    assert slurm_params(grid(tmp_path, "  default: {}\n"), "pretrain", parts).gpus_per_node == 0  # debug is the default


@pytest.mark.parametrize("params, expected", [
    (SlurmParams(partition="a100"), "cluster.pretrain.partition = 'a100': no such partition; this cluster has debug, gpu"),
    (SlurmParams(gpus_per_node=1), "cluster.pretrain.gpus_per_node = 1: partition 'debug' has 0 GPUs per node"),
    (SlurmParams(partition="gpu", cpus_per_task=128), "cluster.pretrain.cpus_per_task = 128: partition 'gpu' has 64"),
])
def test_requests_the_cluster_cannot_meet_are_named(params, expected):
    problems = check_params("cluster.pretrain", params, parse_sinfo(SINFO))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_parameters_and_defaults_are_declared_once(tmp_path):
    """The grid's cluster: entries are SlurmParams (pipeline/spec.py's SlurmSpec is the same class);
    a field set nowhere takes the one default declared there."""
    from pipeline.spec import SlurmSpec

    assert SlurmSpec is SlurmParams
    unset = slurm_params(grid(tmp_path, "  default: {}\n"), "pretrain", parse_sinfo(SINFO))
    assert (unset.timeout_min, unset.nodes, unset.array_parallelism) == (60, 1, 64)
    assert SlurmParams().executor_kwargs()["timeout_min"] == 60
    assert SlurmParams(timeout_min=5).over(SlurmParams(timeout_min=30, mem_gb=2.0)) == SlurmParams(timeout_min=5, mem_gb=2.0)


def test_a_request_that_fits_has_no_problem():
    assert check_params("cluster.pretrain", SlurmParams(partition="gpu", gpus_per_node=8), parse_sinfo(SINFO)) == []


def test_unknown_cluster_fields_and_kinds_are_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(GridError) as err:
        grid(tmp_path, "  default: {partiton: gpu, timeout_min: -1}\n  pretrian: {}\n")
    text = str(err.value)
    assert "cluster.default.partiton" in text and "did you mean 'cluster.default.partition'?" in text
    assert "cluster.default.timeout_min" in text and "must be >= 1" in text
    assert "cluster.pretrian" in text and "did you mean 'pretrain'?" in text


def test_tracking_store_must_be_reachable_from_nodes():
    assert remote_tracking_problem("http://head:5000", "--backend slurm runs stages on other machines") is None
    problem = remote_tracking_problem("sqlite:////home/me/mlflow.db", "--backend slurm runs stages on other machines")
    assert "cannot write to sqlite:////home/me/mlflow.db" in problem and "sslgrid server" in problem


def test_resumable_is_requeued_with_its_arguments():
    r = Resumable(sum)
    assert r([1, 2]) == 3
    again = r.checkpoint([1, 2])
    assert again.function is r and again.args == ([1, 2],)


def test_tasks_share_a_master_port_that_rank_0_found_free(tmp_path):
    """Two 'tasks' of one job, in two processes with SLURM's variables: the second starts first and
    waits for the port rank 0 publishes in the job folder; a requeued attempt gets a fresh file."""
    import os
    import socket
    import subprocess
    import sys

    code = "from cluster.slurm_backend import shared_master_port; print(shared_master_port(timeout_s=60))"

    def task(rank: int, restart: int = 0) -> subprocess.Popen:
        env = dict(os.environ, SUBMITIT_EXECUTOR="slurm", SUBMITIT_FOLDER=str(tmp_path / "%j"), SLURM_JOB_ID="77",
                   SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT=str(restart))
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)

    waiting = task(1)
    ports = {int(task(0).communicate(timeout=60)[0]), int(waiting.communicate(timeout=60)[0])}
    assert len(ports) == 1
    port = ports.pop()
    with socket.socket() as s:  # still free for rank 0's TCPStore to bind
        s.bind(("", port))
    assert (tmp_path / "77" / ".master_port.0").read_text() == str(port)
    again = task(0, restart=1)
    assert int(again.communicate(timeout=60)[0]) > 0 and (tmp_path / "77" / ".master_port.1").exists()


def test_multi_task_jobs_end_when_one_task_fails():
    assert SlurmParams(tasks_per_node=2).executor_kwargs()["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert "slurm_srun_args" not in SlurmParams().executor_kwargs()


def test_a_stage_gets_one_task_per_gpu(tmp_path):
    """{cpus: 32, gpus: 8}: one job of 8 tasks, each with a GPU and 4 CPUs (moco's 8-GPU recipe);
    over 2 nodes, 16 GPUs are 8 tasks and 8 GPUs per node."""
    parts = parse_sinfo(SINFO)
    one = slurm_params(grid(tmp_path, "  default: {partition: gpu}\n", "resources:\n  pretrain: {cpus: 32, gpus: 8}"),
                       "pretrain", parts)
    assert (one.nodes, one.tasks_per_node, one.gpus_per_node, one.cpus_per_task) == (1, 8, 8, 4)
    two = slurm_params(grid(tmp_path, "  default: {partition: gpu}\n  pretrain: {nodes: 2}\n",
                            "resources:\n  pretrain: {cpus: 64, gpus: 16}"), "pretrain", parts)
    assert (two.nodes, two.tasks_per_node, two.gpus_per_node, two.cpus_per_task) == (2, 8, 8, 4)
    # explicit processes win: 2 processes sharing 8 GPUs
    mine = slurm_params(grid(tmp_path, "  default: {partition: gpu}\n",
                             "resources:\n  pretrain: {cpus: 32, gpus: 8, processes: 2}"), "pretrain", parts)
    assert (mine.tasks_per_node, mine.gpus_per_node, mine.cpus_per_task) == (2, 8, 16)

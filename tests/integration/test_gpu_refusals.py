"""``sslgrid run`` on a Ray cluster with a GPU refuses a stage whose unset ``gpus`` resolves to fewer
GPUs than its processes (issue 19): exit 2 before any stage runs, naming the file, the field and
the fix. Ray declares a logical GPU on this CPU machine (--num-gpus 1)."""
from __future__ import annotations

import pytest

from tests.integration.helpers import TINY, sslgrid, stage_runs, write_grid

pytestmark = pytest.mark.integration


def test_unset_gpus_on_a_cluster_with_one_gpu_refuse_two_processes(tmp_path):
    grid = write_grid(tmp_path, TINY)
    out = sslgrid(grid, tmp_path, "--num-gpus", "1", "--num-cpus", "2", "-o", "resources.pretrain.processes=2",
                  "-o", "resources.pretrain.cpus=2", timeout=300)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert (f"{grid}: resources.pretrain.gpus is unset, which means 1 GPU on this backend, but "
            f"resources.pretrain.processes is 2") in text, text
    assert "Set resources.pretrain.gpus to 2, or to 0 to run the processes on CPUs" in text and "Nothing was launched" in text
    assert all(r.info.status != "FINISHED" for r in stage_runs(tmp_path))
    assert not list((tmp_path / "runs").glob("pretrain/*/result.json"))

"""``sslgrid run --decide`` end to end on a real local Ray cluster and a real MLflow SQLite store:
rounds of seeds for the open claim, killed mid-round and resumed at the same look, a finished
decision rerun for nothing, and ``plan --decide``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.helpers import REPO, cli_args, sslgrid, stage_runs, write_grid

pytestmark = pytest.mark.integration

DECIDE = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 128, num_val: 64}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 1, batch_size: 32, lr: 0.03, K: 64, m: 0.99, head: {kind: mlp, out_dim: 32}}
  linear_probe: {epochs: 2, batch_size: 64}
studies:
  table1:
    axes:
      pretrain.head.kind: [mlp, none]
cells:
  - {name: random, pretrain.method: none}
evaluations: [linear_probe]
decide: {start_seeds: 2, max_seeds: 3}
resources:
  pretrain: {cpus: 1}
  linear_probe: {cpus: 1}
"""


def _state(tmp_path) -> dict | None:
    try:
        return json.loads((tmp_path / "runs" / "decide.json").read_text())
    except (OSError, ValueError):
        return None


def test_a_killed_decision_resumes_at_its_look_and_a_finished_one_spends_nothing(tmp_path):
    grid = write_grid(tmp_path, DECIDE)
    plan = sslgrid(grid, tmp_path, "--decide", sub="plan")
    assert plan.returncode == 0, plan.stderr
    assert "--decide: 1 claim decided together (table1.mlp-beats-none)" in plan.stdout
    assert "first round (the table above): 5 pretrainings, 10 stages" in plan.stdout
    assert "worst case (every cell of the claims at 3 seeds): 7 pretrainings, 14 stages" in plan.stdout

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cli_args(grid, tmp_path, "--decide"), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((s := _state(tmp_path)) and s["rounds"] == 1):
        time.sleep(0.5)
    assert _state(tmp_path)["seeds"]["table1/head.kind=mlp"] == 3, "round 1 did not end in time"
    first = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "pretrain").glob("*/DONE")}
    assert len(first) == 5  # round 1: 2 cells x 2 seeds + the random init
    while time.time() < deadline and len(list((tmp_path / "runs" / "pretrain").glob("*/spec.json"))) < 6:
        time.sleep(0.2)  # until a pretraining of round 2 has started
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    killed = _state(tmp_path)
    assert killed["rounds"] == 1 and killed["looks"] == {"table1.mlp-beats-none": [2]}

    again = sslgrid(grid, tmp_path, "--decide")
    assert again.returncode == 0, again.stdout + again.stderr
    state = _state(tmp_path)
    # the look at 3 seeds was taken once, after round 2; round 1's finished pretrainings did not run again
    assert state["finished"] and state["rounds"] == 2 and state["looks"] == {"table1.mlp-beats-none": [2, 3]}
    assert state["why"] in ("every claim is decided", "the open claims reached max_seeds (3)")
    assert {p: p.stat().st_mtime for p in first} == first
    assert "cached" in again.stdout and "## Verdicts" in again.stdout
    runs = stage_runs(tmp_path)
    keys = [r.data.tags["sslgrid.key"] for r in runs]
    assert len(keys) == len(set(keys)) == 14 and all(r.info.status == "FINISHED" for r in runs)

    rerun = sslgrid(grid, tmp_path, "--decide")
    assert rerun.returncode == 0 and "ran 0, cached 14, failed 0" in rerun.stdout
    assert _state(tmp_path) == state  # nothing spent, nothing looked at again
    assert "Rerunning it spends nothing" in rerun.stdout

    changed = sslgrid(grid, tmp_path, "--decide", "-o", "decide.alpha=0.1")
    assert changed.returncode == 2 and "decide settings changed since this decision started (alpha 0.05" in \
        changed.stderr

"""bench/gpu_check.py, the script `make gpu-check` runs on a GPU machine, runs every part end to end
(tiny sizes, on this CPU), so that a session lent a GPU spends its minutes measuring, not debugging."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_part(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, SSLGRID_CACHE=str(tmp_path / "cache")), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for part in ("quickstart table1/head.kind=mlp: pretraining", "quickstart random-init", "moco reference loader",
                 "decodes per rank over one epoch, 2 ranks: 32 and 32", "Algorithm 1 (fp32)", "end-to-end MoCo v2",
                 "2 processes (gloo) on one device against 1", "gpu check done"):
        assert part in text, (part, text)
    assert all(line.startswith("[") for line in text.strip().splitlines())  # every figure names the card

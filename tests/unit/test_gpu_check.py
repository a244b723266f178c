"""bench/gpu_check.py, what `make gpu-check` runs on a lent GPU machine, run end to end on this CPU at
tiny sizes, with only the GPU machine's packages importable (tests/unit/gpu_image_site blocks every
other distribution, ruamel.yaml, Ray, MLflow, submitit and pycocotools among them), so that a session
lent a GPU spends its minutes measuring, not debugging: every part writes its figures to the JSON
file, and a part that fails or hangs is loud and loses nothing else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import PARTS, error_lines
from bench.gpu_image import IMAGE_LIST, MISSING

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).with_name("gpu_image_site")


def image_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that sees only the GPU image's packages."""
    return dict(os.environ, PYTHONPATH=f"{SITE}{os.pathsep}{REPO}", SSLGRID_IMAGE_LIST=str(IMAGE_LIST),
                SSLGRID_BLOCK=",".join(MISSING.values()), SSLGRID_BLOCK_LOG=str(tmp_path / "blocked.log"),
                SSLGRID_CACHE=str(tmp_path / "cache"), **extra)


def check(tmp_path: Path, *args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path / "f.json"), *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def test_the_image_environment_blocks_what_the_image_lacks(tmp_path):
    code = ("import importlib\n"
            "for m in ('ruamel.yaml', 'ray', 'mlflow', 'submitit', 'pycocotools'):\n"
            "    try:\n        importlib.import_module(m)\n    except ImportError:\n        continue\n"
            "    raise SystemExit(m + ' imported')\n"
            "import torch, torchvision, yaml, PIL, numpy\n")
    out = subprocess.run([sys.executable, "-c", code], env=image_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_part_reports_with_only_the_gpu_image_packages(tmp_path):
    out = check(tmp_path, env=image_env(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["finished"] and doc["failed"] == [] and doc["smoke"]
    assert set(doc["parts"]) == {p.name for p in PARTS}
    m = doc["machine"]
    assert m["nproc"] >= 1 and m["shm_total_bytes"] and m["torch"] and m["card"] == "CPU (no CUDA)"
    for name, part in doc["parts"].items():
        assert (part["status"], part["exit_code"], part["card"]) == ("ok", 0, "CPU (no CUDA)"), (name, part)
        assert part["wall_s"] > 0 and part["figures"], (name, part)
        for fig in part["figures"].values():
            assert {"value", "unit"} <= set(fig)
    figs = {name: part["figures"] for name, part in doc["parts"].items()}
    assert {"ours_fp32_images_per_second", "algorithm1_fp32_tf32_off_images_per_second",
            "algorithm1_tf32_images_per_second"} <= set(figs["step"])
    assert figs["step"]["algorithm1_fp32_tf32_off_images_per_second"]["cudnn_allow_tf32"] is False
    assert figs["step"]["algorithm1_tf32_images_per_second"]["cudnn_allow_tf32"] is True
    assert figs["sync_count"]["mocov2_aug_plus_in_memory_list_tensors"]["value"] == 0
    assert figs["e2e"]["streamed_images_per_second"]["timed_batches"] == figs["e2e"]["in_memory_images_per_second"][
        "timed_batches"]
    assert figs["e2e"]["streamed_images_per_second"]["warmup_batches"] == 2 * 4 + 3  # 2 workers × prefetch 4 + 3
    assert {"plain_bn_images_per_second", "split_bn_8_images_per_second"} <= set(figs["split_bn"])
    assert {"workers_pil_images_per_second", "device_cpu_images_per_second"} <= set(figs["decode"])
    # the grid was read without ruamel.yaml: the import was tried, blocked, and bench/yaml12.py stood in
    assert "ruamel" in (tmp_path / "blocked.log").read_text()
    for line in out.stdout.splitlines():  # every line names the card, the part, or is the check's own
        assert line.startswith(("[CPU (no CUDA)] ", "gpu check: ")) or line.split("]")[0][1:] in doc["parts"], line


def test_a_failing_or_hanging_part_is_loud_and_the_others_still_report(tmp_path):
    """step raises at its start, sync_count hangs after its first figure (stopped at its cap, that
    figure kept), data_path runs: the JSON has what each wrote, and the exit code is 1."""
    env = image_env(tmp_path, SSLGRID_GPU_CHECK_FAIL="step,sync_count:hang")
    out = check(tmp_path, "--parts", "sync_count,step,data_path", "--cap", "sync_count=25", env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    doc = json.loads((tmp_path / "f.json").read_text())
    parts = doc["parts"]
    assert doc["finished"] and doc["failed"] == ["sync_count", "step"]
    assert parts["sync_count"]["status"] == "timeout" and len(parts["sync_count"]["figures"]) == 1
    assert parts["step"]["status"] == "failed" and parts["step"]["exit_code"] == 1 and "figures" not in parts["step"]
    assert parts["step"]["error"]["last"][-1] == ("RuntimeError: injected failure "
                                                  "(SSLGRID_GPU_CHECK_FAIL=step,sync_count:hang)")
    assert parts["data_path"]["status"] == "ok" and parts["data_path"]["figures"]
    text = out.stdout
    assert "[sync_count] stopped at its cap of 25 s" in text
    assert "[step] FAILED after" in text and "exit code 1" in text
    assert "[step]   Traceback (most recent call last):" in text and "[step]   RuntimeError: injected failure" in text
    assert "gpu check: 1 of 3 parts passed" in text


def test_a_bad_part_name_is_refused_with_exit_2(tmp_path):
    out = check(tmp_path, "--parts", "step,stepp", env=image_env(tmp_path))
    assert out.returncode == 2 and "unknown stepp; parts are sync_count, step" in out.stderr
    assert not (tmp_path / "f.json").exists()


def test_a_failed_parts_error_is_its_last_traceback():
    stderr = ("UserWarning: something noisy\n  warnings.warn(\n"
              "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    f()\n"
              "  File \"a.py\", line 3, in f\n    g()\n  File \"a.py\", line 5, in g\n    raise ValueError('x')\n"
              "ValueError: x\n")
    first, last = error_lines(stderr)
    assert first == ["Traceback (most recent call last):", '  File "a.py", line 1, in <module>', "    f()"]
    assert last == ['  File "a.py", line 5, in g', "    raise ValueError('x')", "ValueError: x"]
    assert error_lines("Killed\n") == (["Killed"], [])

"""Every GPU figure of the real-scale path, in one command for a machine with one GPU and no network,
Ray, MLflow, submitit or ruamel.yaml (only the packages of bench/gpu_image.py's list). ``make
gpu-check`` runs it; docs/real-scale.md has the ready command for a lent GPU machine.

Each part runs in a process of its own, under a time cap, one after the other (bench/gpu_parts.py):

==============  ==========================================================================  =====
part            what it measures                                                            cap s
==============  ==========================================================================  =====
sync_count      host synchronisations: augmentation (quickstart's recipe, MoCo v2            25
                aug-plus) in memory and streamed, and a MoCo v2 step (expect 0)
step            ResNet-50 MoCo v2 step at 224 px, batch 128: bf16 + channels_last against     55
                Algorithm 1 in fp32 with TF32 off, and with TF32 on
split_bn        ResNet-50 forward + backward, 8 BN groups (ours; moco's reshape) vs plain BN 40
hard_negatives  K = 65,536 MoCo v2 step with hard negatives against the plain one             40
data_path       JPEG → two views, batch 128: the streaming path against moco's loader          55
e2e             MoCo v2 ResNet-50 pretraining (the stage's loop), streamed JPEGs against       70
                the same images in memory, the same steady steps each
decode          JPEG decoding in DataLoader workers (PIL) against on the GPU (nvJPEG)          50
quickstart      the quickstart's pretraining and probe recipes on CUDA                         40
two_processes   2 data-parallel processes (gloo) on the one GPU against 1                      40
==============  ==========================================================================  =====

The caps add up to 415 s and the whole check stops at ``--budget`` (420 s, 7 minutes): a part gets
its cap or what is left of the budget, whichever is less, so two runs fit in 15 minutes of GPU time.
Each cap is an estimate for one H100 (not measured: no GPU has run this yet), each part's own
windows are bounded (bench/steady.py), and a part cut at its cap keeps the figures it wrote.

What is printed and kept:

- every figure, as soon as it is measured, on stdout with the card's name, and in the JSON file
  ``--out`` (bench/figures.py: atomic rewrites, so a run cut short keeps everything measured);
- with the card's name, torch's version, ``nproc``, /dev/shm's size, each part's wall time, cap,
  exit code and, for a part that failed, its error's first and last lines;
- the exit code: 0 when every part passed, 1 when any failed, timed out or was skipped for want
  of budget, 2 for a bad command line.

    python3 bench/gpu_check.py --out runs/gpu.json            # on the GPU machine
    python3 bench/gpu_check.py --smoke --out f.json           # tiny sizes, on a CPU (make test runs it)
    python3 bench/gpu_check.py --parts e2e,decode --cap e2e=120 --out f.json   # a rerun of two parts

``SSLGRID_GPU_CHECK_FAIL=<part>[:hang][,<part>...]`` makes a part raise at its start (or hang after
its first figure): how the tests check that a failure is loud and loses nothing else.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import figures  # noqa: E402  (standard library only: the parent imports no torch)

FAIL_ENV = "SSLGRID_GPU_CHECK_FAIL"
BUDGET_S = 420.0
MIN_CAP_S = 5.0  # a part is not started with less than this left of the budget
SMOKE_CAP_S = 240.0  # per part on a CPU: a hang, not a slow machine, should hit it
ERROR_LINES = 3  # first and last lines of a failed part's error, printed and kept


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # seconds on one H100, start-up (python, torch, CUDA) included: an estimate


PARTS = (Part("sync_count", 25), Part("step", 55), Part("split_bn", 40), Part("hard_negatives", 40),
         Part("data_path", 55), Part("e2e", 70), Part("decode", 50), Part("quickstart", 40),
         Part("two_processes", 40))


class _Stop(Exception):
    """SIGTERM or SIGINT reached the check (``timeout 540``, Ctrl-C): stop the running part, keep the rest."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def machine() -> dict[str, Any]:
    """What the parent can read without importing torch: CPUs, /dev/shm, versions, nvidia-smi's cards."""
    total, free = figures.shm_bytes()
    try:
        torch_version: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    cards = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        cards = out.stdout.strip().splitlines() or None
    return {"nproc": figures.nproc(), "cpu_count": os.cpu_count(), "shm_total_bytes": total, "shm_free_bytes": free,
            "python": sys.version.split()[0], "torch": torch_version, "nvidia_smi": cards,
            "card": cards[0] if cards else None}


def error_lines(stderr: str) -> tuple[list[str], list[str]]:
    """(first, last) lines of a failed part's error: of its last traceback when there is one (the last
    lines name the exception), else of all it wrote on stderr."""
    lines = [ln for ln in stderr.rstrip().splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    block = lines[starts[-1]:] if starts else lines
    if len(block) <= 2 * ERROR_LINES:
        return block, []
    return block[:ERROR_LINES], block[-ERROR_LINES:]


def _kill_group(proc: subprocess.Popen) -> None:
    """End a part and everything it started (DataLoader workers, spawned ranks): its process group."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_parts(parts: list[Part], caps: dict[str, float], out: Path, smoke: bool, budget: float) -> int:
    """Run each part in its own process under its cap; record what came of it. Returns the exit code."""
    info = machine()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def fresh(doc: dict) -> None:
        doc.clear()
        doc.update(check="bench/gpu_check.py", command=sys.argv, smoke=smoke,
                   budget_s=budget if budget != float("inf") else None, started=started,
                   machine=info, parts={p.name: {"status": "pending"} for p in parts}, finished=False, failed=[])

    figures.update(out, fresh)
    shm = (f"{info['shm_total_bytes'] / 2**30:.1f} GiB ({info['shm_free_bytes'] / 2**30:.1f} GiB free)"
           if info["shm_total_bytes"] else "none")
    print(f"gpu check: {', '.join(info['nvidia_smi'] or ['no nvidia-smi'])}; torch {info['torch']}; nproc "
          f"{info['nproc']}; /dev/shm {shm}; " + (f"budget {budget:.0f} s" if budget != float("inf") else "no budget")
          + f"; figures to {out}", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    failed: list[str] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sslgrid-gpu-check-") as tmp:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("SSLGRID_CACHE", str(Path(tmp) / "cache"))  # the JPEG tree is made once, for every part
        for part in parts:
            left = budget - (time.monotonic() - t_start)
            cap = min(caps.get(part.name, SMOKE_CAP_S if smoke else part.cap_s), left)
            if cap < MIN_CAP_S:
                failed.append(part.name)
                reason = f"{left:.0f} s left of the {budget:.0f} s budget"

                def skipped(doc: dict, name: str = part.name, why: str = reason) -> None:
                    doc["parts"][name].update(status="skipped", reason=why)

                figures.update(out, skipped)
                print(f"[{part.name}] SKIPPED: {reason}", flush=True)
                continue
            status = _run_one(part.name, cap, out, smoke, Path(tmp), env)
            if status != "ok":
                failed.append(part.name)
    wall = time.monotonic() - t_start

    def done(doc: dict) -> None:
        doc.update(finished=True, failed=failed, wall_s=round(wall, 1))

    figures.update(out, done)
    print(f"gpu check: {len(parts) - len(failed)} of {len(parts)} parts passed in {wall:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; figures in {out}", flush=True)
    return 1 if failed else 0


def _run_one(name: str, cap: float, out: Path, smoke: bool, tmp: Path, env: dict[str, str]) -> str:
    """One part in its own process group; its status (ok, failed, timeout, interrupted) is recorded
    and printed, with its exit code and its error's first and last lines."""
    figures.update(out, lambda d: d["parts"][name].update(status="running", cap_s=round(cap, 1)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(out), "--work", str(tmp / name)]
    if smoke:
        cmd.append("--smoke")
    err_path = tmp / f"{name}.stderr"
    t = time.monotonic()
    status, rc = "failed", None
    with open(err_path, "w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status, rc = "timeout", proc.returncode
        except _Stop as stop:
            _kill_group(proc)
            status, rc = "interrupted", proc.returncode
            _record(out, name, status, rc, time.monotonic() - t, cap, err, str(stop))
            raise
        _record(out, name, status, rc, time.monotonic() - t, cap, err)
    return status


def _record(out: Path, name: str, status: str, rc: int | None, wall: float, cap: float, err, why: str = "") -> None:
    err.seek(0)
    text = err.read()
    first, last = error_lines(text) if status != "ok" else ([], [])

    def put(doc: dict) -> None:
        doc["parts"][name].update(status=status, exit_code=rc, wall_s=round(wall, 1), cap_s=round(cap, 1),
                                  error={"first": first, "last": last} if status != "ok" else None,
                                  stderr_tail=text[-3000:] if status != "ok" else None)

    figures.update(out, put)
    if status == "ok":
        print(f"[{name}] ok in {wall:.1f} s (cap {cap:.0f} s), exit code 0", flush=True)
        return
    what = {"timeout": f"stopped at its cap of {cap:.0f} s",
            "interrupted": f"interrupted ({why})"}.get(status, "FAILED")
    print(f"[{name}] {what.upper() if status == 'failed' else what} after {wall:.1f} s, exit code {rc}; its figures "
          f"so far are kept", flush=True)
    for line in first:
        print(f"[{name}]   {line}", flush=True)
    if last:
        print(f"[{name}]   ...", flush=True)
    for line in last:
        print(f"[{name}]   {line}", flush=True)


def run_part(name: str, out: Path, smoke: bool, work: Path) -> int:
    """One part, in this process (``--part``): what the parent starts."""
    import torch

    from bench import gpu_parts

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA)"
    fail = dict(item.partition(":")[::2] for item in os.environ.get(FAIL_ENV, "").split(",") if item)
    mode = fail.get(name, None)
    seen = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        seen.update(capability=f"{props.major}.{props.minor}", memory_bytes=props.total_memory)

    def put(doc: dict) -> None:
        doc.setdefault("machine", {}).update({k: v for k, v in seen.items()})
        doc.setdefault("parts", {}).setdefault(name, {}).update(card=card, torch=torch.__version__)

    figures.update(out, put)
    if mode == "":  # named without ":hang"
        raise RuntimeError(f"injected failure ({FAIL_ENV}={os.environ[FAIL_ENV]})")
    work.mkdir(parents=True, exist_ok=True)
    fig = figures.Figures(out, name, card, hang_after_first=mode == "hang")
    gpu_parts.PARTS[name](fig, smoke, work)
    return 0


def main(argv: list[str] | None = None) -> int:
    names = [p.name for p in PARTS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check.json", help="the JSON file of every figure (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part runs, on a CPU")
    ap.add_argument("--parts", default=",".join(names), help=f"comma-separated, from: {', '.join(names)}")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for all parts (default {BUDGET_S:.0f}; "
                    f"none with --smoke)")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="a part's own cap")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process (the parent's children)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if args.part:
        return run_part(args.part, out, args.smoke, Path(args.work or tempfile.mkdtemp()))
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in names]
    caps: dict[str, float] = {}
    for text in args.cap:
        part, _, seconds = text.partition("=")
        try:
            caps[part] = float(seconds)
        except ValueError:
            unknown.append(f"--cap {text} (expected PART=SECONDS)")
        if part not in names:
            unknown.append(part)
    if unknown or not chosen:
        print(f"bench/gpu_check.py: --parts/--cap: unknown {', '.join(unknown) or 'empty list'}; parts are "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (float("inf") if args.smoke else BUDGET_S)
    try:
        return run_parts([p for p in PARTS if p.name in chosen], caps, out, args.smoke, budget)
    except _Stop as stop:
        print(f"gpu check: stopped by {stop}; figures so far in {out}", flush=True)
        return 130 if str(stop) == "SIGINT" else 143


if __name__ == "__main__":
    sys.exit(main())

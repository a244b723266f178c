"""Exclusive locks on a work directory, a stage directory or a store, that die with their process.

A lock is ``fcntl.flock`` on a file that records who holds it (pid, host, start time, command). The
kernel releases a flock when its process exits, however it exits, so a lock never outlives its
holder on a local disk; on NFS, Linux maps flock to POSIX locks, which the server releases when the
client's lease lapses. A lock found free but naming a holder is stale: it is taken over, and the
caller is told whose it was.

- ``runs/<grid>/.sslgrid.lock``: one ``sslgrid run`` per work directory (a double submit exits 2).
- ``<stage dir>/.running.lock``: one process runs a stage at a time, whatever reached it (a second
  Ray driver, a retried task whose first attempt lives on, a requeued SLURM job).
- ``mlflow.db.lock``: one process creates and migrates a new SQLite store.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LockBusy(Exception):
    """The lock is held by a live process; ``holder`` says which (pid, host, since, command)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe(holder)}")


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder["time"])) if holder.get("time") else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"


@dataclass
class Lock:
    path: Path
    fd: int
    stale: dict[str, Any] | None  # the holder recorded by a process that died holding it

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)  # the file stays (unlinking would race a process opening it)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = -1

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def acquire(path: Path, what: str = "", wait: bool = False) -> Lock:
    """Take the lock at ``path`` now, or raise LockBusy naming its holder; with ``wait``, block
    until it is free instead.

    Raises OSError when ``path``'s folder cannot be created or written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + PROBE_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            break
        except BlockingIOError:
            holder = _read(fd)
            if _probe(holder) and time.monotonic() < deadline:  # held() probing for a moment
                time.sleep(0.01)
                continue
            os.close(fd)
            raise LockBusy(path, holder) from None
        except OSError:
            os.close(fd)
            raise
    stale = _read(fd) or None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "what": what,
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return Lock(path, fd, stale)


def try_acquire(path: Path, what: str = "") -> Lock | None:
    """``acquire``, or None when a live process holds the lock."""
    try:
        return acquire(path, what)
    except LockBusy:
        return None


def held(path: Path) -> dict[str, Any] | None:
    """The holder of the lock at ``path`` when a live process holds it, else None. Creates nothing."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        return None if _probe(holder) else holder
    except OSError:
        return None
    finally:
        os.close(fd)  # also releases the lock this probe may have taken
    return None


def _probe(holder: dict[str, Any]) -> bool:
    """Whether a lock that is held names no live holder: then ``held`` (another process asking) has it
    for a moment, or the holder has not written itself yet. A holder on another host counts as live."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


WORKDIR_LOCK = ".sslgrid.lock"
PROBE_GRACE_S = 1.0  # a lock that is held but names no holder is a held() probe (microseconds) or a holder writing

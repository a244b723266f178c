"""What pipeline/execute.py needs from the place where work runs: the ``Backend`` protocol.

Three backends implement it:
- cluster/ray_backend.py ``RayBackend``: a private local Ray cluster, or one joined by address;
- cluster/slurm_backend.py ``SlurmBackend``: one SLURM job per task, ordered by a local Ray DAG;
- cluster/inprocess.py ``InProcessBackend``: the caller's own process, one task after another
  (tests of pipeline/execute.py without a cluster).

This module imports neither torch nor ray, so code that only names a backend loads anywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

# What ``submit`` returns and ``wait``/``outcome`` take: a Ray ObjectRef, or the in-process Task.
# Hashable, because the caller keys its bookkeeping by it.
Handle = Hashable


class ResourceError(Exception):
    """A task asks for more than the backend has; it would wait forever. The message starts with
    the task's label (e.g. ``resources.pretrain``), which the CLI names in its fix."""


@runtime_checkable
class Backend(Protocol):
    """Runs callables as tasks that depend on each other through their arguments.

    Used as a context manager: entering starts or joins whatever runs the tasks, leaving stops it or
    lets it go. A handle passed (at the top level) in another task's ``args`` stands for that
    task's return value: the dependent task starts only after it succeeded, and when it failed the
    dependent task does not run and its outcome is the same failure."""

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...

    def resources(self) -> dict[str, float]:
        """Everything the backend has, by resource name: ``CPU`` (cores) and ``GPU`` (devices)."""
        ...

    def check_fits(self, label: str, cpus: float, gpus: float) -> None:
        """Raise ``ResourceError`` starting with ``label`` when one task asking for ``cpus`` cores and
        ``gpus`` devices could never start here."""
        ...

    def submit(self, fn: Callable, args: Sequence[Any], *, name: str, cpus: float, gpus: float,
               retries: int = 0, processes: int = 1) -> Handle:
        """Run ``fn(*args)`` as a task named ``name``, each of its ``processes`` with ``cpus`` cores and
        ``gpus`` devices; a crashed worker (never an exception ``fn`` raised) is retried ``retries``
        times. Returns at once."""
        ...

    def wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        """(ended, still running) among ``handles``, after at most ``timeout`` seconds."""
        ...

    def outcome(self, handle: Handle) -> tuple[bool, Any]:
        """(True, the return value) or (False, the exception) of an ended task."""
        ...


def check_fits(label: str, cpus: float, gpus: float, total: dict[str, float], where: str) -> None:
    """Raise ``ResourceError`` when ``cpus`` or ``gpus`` exceed ``total`` (``resources()``); ``where``
    names what has too few, e.g. "the Ray cluster"."""
    for name, want in (("CPU", cpus), ("GPU", gpus)):
        have = total.get(name, 0.0)
        if want > have:
            raise ResourceError(f"{label} asks for {want:g} {name}s but {where} has {have:g}")

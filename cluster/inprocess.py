"""The ``Backend`` protocol (cluster/backend.py) in the caller's own process, one task at a time:
pipeline/execute.py without a cluster, for tests.

- ``submit`` only records the task. ``wait`` and ``outcome`` run the tasks they are asked about,
  in the order they were submitted, which is a dependency order: a task's arguments can only hold
  handles that ``submit`` had already returned.
- A handle among a task's arguments is replaced by that task's return value, as Ray does with an
  ObjectRef. When that task failed, the dependent task does not run and its outcome is the same
  exception, as it is on Ray.
- Arguments and return values are copied through the standard pickle, so a task cannot change its
  caller's objects. Ray and submitit use cloudpickle, which also carries lambdas and local
  functions: this backend is stricter than they are for arguments, and it never pickles ``fn``.
- Only the task's own exceptions exist here, so ``retries`` (Ray's, for crashed workers) is kept
  in the record and never used. One process per task: ``processes`` > 1 is refused.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.backend import check_fits


@dataclass(eq=False)  # a handle: hashed and compared by identity, as ObjectRefs are
class Task:
    """One submitted callable and, once it ran, what came of it."""

    name: str
    fn: Callable
    args: tuple
    cpus: float
    gpus: float
    retries: int
    state: str = "pending"  # pending | done | failed
    value: Any = field(default=None, repr=False)  # the return value, or the exception


class InProcessBackend:
    """Runs every task in this process. ``cpus``/``gpus``: what ``resources`` reports and
    ``check_fits`` checks against. ``submitted`` lists every task in submission order; ``entered``
    counts the times it was used as a context manager."""

    def __init__(self, cpus: float = 1.0, gpus: float = 0.0) -> None:
        self.cpus, self.gpus = float(cpus), float(gpus)
        self.submitted: list[Task] = []
        self.entered = 0

    def __enter__(self) -> InProcessBackend:
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def resources(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus}

    def check_fits(self, label: str, cpus: float, gpus: float) -> None:
        """Raises ResourceError when one task asks for more than ``cpus``/``gpus``."""
        check_fits(label, cpus, gpus, self.resources(), "the in-process backend")

    def submit(self, fn: Callable, args: Sequence[Any], *, name: str, cpus: float, gpus: float,
               retries: int = 0, processes: int = 1) -> Task:
        """Records ``fn(*args)``; it runs when ``wait`` or ``outcome`` asks for it. Raises ValueError
        for ``processes`` > 1."""
        if processes != 1:
            raise ValueError(f"{name}: the in-process backend runs one process per task, not {processes}")
        task = Task(name, fn, tuple(args), cpus, gpus, retries)
        self.submitted.append(task)
        return task

    def wait(self, handles: list[Task], timeout: float) -> tuple[list[Task], list[Task]]:
        """Runs every task in ``handles`` (and what they depend on) to its end: (all of them, [])."""
        for task in sorted(handles, key=self.submitted.index):
            self._run(task)
        return list(handles), []

    def outcome(self, handle: Task) -> tuple[bool, Any]:
        """(True, the return value) or (False, the exception), running the task first if need be."""
        self._run(handle)
        return handle.state == "done", handle.value

    def names(self) -> list[str]:
        """The submitted tasks' names, in submission order."""
        return [t.name for t in self.submitted]

    def _run(self, task: Task) -> None:
        if task.state != "pending":
            return
        args = []
        for a in task.args:
            if isinstance(a, Task):
                self._run(a)
                if a.state == "failed":
                    task.state, task.value = "failed", a.value
                    return
                a = a.value
            args.append(a)
        try:
            value = pickle.loads(pickle.dumps(task.fn(*pickle.loads(pickle.dumps(args)))))
        except Exception as err:  # the task's failure; KeyboardInterrupt and SystemExit stop the caller
            task.state, task.value = "failed", err
            return
        task.state, task.value = "done", value

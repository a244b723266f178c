"""The metrics sink a stage is given. Trainers and evaluators never open an MLflow run themselves:
pipeline backs this protocol with MLflow; tests use :class:`ListSink`."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    # timestamp_ms: when the values were measured (Unix ms; default now). The training loop gives the time
    # it kept in the checkpoint, so that a point logged again on resume is the same point, which MLflow's
    # store keeps once (its metrics key is key, timestamp, step, value)
    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None: ...
    def artifact(self, path: Path) -> None: ...
    def progress(self, done: int, total: int) -> None: ...
    def warn(self, message: str) -> None: ...  # something the user must hear of, though the stage goes on


class ListSink:
    """Keeps everything in lists, for tests and for direct calls."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.stamps: list[int | None] = []  # each log call's timestamp_ms, None where the caller gave none
        self.artifacts: list[Path] = []
        self.progress_calls: list[tuple[int, int]] = []
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))
        self.stamps.append(timestamp_ms)

    def artifact(self, path: Path) -> None:
        self.artifacts.append(Path(path))

    def progress(self, done: int, total: int) -> None:
        self.progress_calls.append((done, total))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.metrics if name in m]


class NullSink:
    """Drops everything: the sink of a rank other than 0 in a multi-process stage."""

    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def progress(self, done: int, total: int) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

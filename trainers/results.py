"""What stages return: typed results, and their result.json form. Standard library only.

A pretraining returns a ``PretrainResult``, which its evaluations receive as their upstream; an
evaluation returns an ``EvalResult``. ``to_json`` gives the flat object result.json has always held,
and ``from_json`` reads it back, from this release or an earlier one (unknown keys are ignored,
absent ones take their defaults), so a finished stage's result feeds new stages unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


SECONDS = "seconds"  # the stage's wall time, added to result.json and its metrics by pipeline/execute.py


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class PretrainResult:
    """``checkpoint``: path of checkpoints/final.pt (backbone and model weights); ``feat_dim``: the
    backbone's feature width C; ``epochs``: the spec's; ``processes``: how many trained it;
    ``epochs_trained`` and the last epoch's mean ``loss`` and accuracy: None for random init."""

    checkpoint: str
    feat_dim: int
    epochs: int
    processes: int = 1
    epochs_trained: int | None = None
    loss: float | None = None
    inst_acc: float | None = None
    train_acc: float | None = None

    @property
    def step(self) -> int:
        """The MLflow step of its final values: after the last epoch's."""
        return self.epochs

    @property
    def metrics(self) -> dict[str, float]:
        """Every number it holds, as MLflow metrics."""
        return {k: float(v) for k, v in self.to_json().items() if _number(v)}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PretrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class EvalResult:
    """An evaluation's outcome: ``metrics`` (name → number) are logged to its MLflow run at ``step``
    and read by the report; ``info`` is the rest of result.json (e.g. the probe's protocol)."""

    metrics: dict[str, float]
    step: int = field(default=0, compare=False)  # where it was logged, not part of what it is
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, values: dict[str, Any], step: int = 0) -> EvalResult:
        """Numbers of ``values`` as metrics, everything else as info."""
        return cls({k: v for k, v in values.items() if _number(v)}, step,
                   {k: v for k, v in values.items() if not _number(v)})

    def to_json(self) -> dict[str, Any]:
        return {**self.info, **self.metrics}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        """result.json → EvalResult; ``seconds`` (the stage's wall time, which the driver adds) is
        left out, as it is of the result the stage function returned."""
        return cls.of({k: v for k, v in d.items() if k != SECONDS})

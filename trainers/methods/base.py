"""What a pretraining method is, as one record, and the spec sections several methods share.

Importing this module (or any module of trainers/methods/ but through a method's ``build``) imports
no torch, so that pipeline/ can validate a grid, plan it and estimate its cost on a login node.
A method's model code is imported by its ``build`` function, when a stage trains it.

Field metadata, read by pipeline/spec.py's validator (``param`` writes it):
- ``identity=False``: the field cannot change results and is left out of stage identities;
- ``choices``, ``min``/``max`` (inclusive), ``pattern`` with ``example``: what a value may be;
- ``doc``: one line shown in error messages; ``path``: ``~`` is expanded;
- ``legacy``: for a field added after stages existed, the value that reproduces what they ran; the
  field is left out of the identity while it holds that value.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from trainers.names import HEADS

if TYPE_CHECKING:
    import torch.nn as nn


def param(default: Any, **meta: Any) -> Any:
    """A dataclass field with validator metadata (see the module docstring). Raises TypeError for a
    list or dict default (frozen specs hold tuples)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for list defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class HeadSpec:
    """The projection head g: h → z (trainers/heads.py)."""

    kind: str = param("mlp", choices=HEADS)
    hidden_dim: Optional[int] = param(None, min=1, doc="default: the backbone's feature dimension")
    out_dim: int = param(128, min=1)
    batchnorm: bool = param(False, doc="BN after each hidden fc (SimCLR's head; MoCo v2's has none)")


@dataclass(frozen=True)
class NegativesSpec:
    """How MoCo picks its K negatives from the queue (trainers/negatives.py)."""

    sampling: str = param("all", choices=("all", "hard"))
    shape: float = param(4.0, doc="skew-normal shape alpha (> 0: long tail towards easy ranks)")
    loc: float = param(0.0, doc="skew-normal location, in units of the queue length")
    scale: float = param(0.4, min=1e-6, doc="skew-normal scale, in units of the queue length")


@dataclass(frozen=True)
class NoConfig:
    """A method without fields of its own."""


@dataclass(frozen=True)
class Context:
    """What a builder may need besides the spec: the crop side in pixels, the number of classes,
    the number of training images, and the optimizer steps of the whole run."""

    size: int
    num_classes: int
    n_data: int
    total_steps: int


@dataclass
class Training:
    """What ``build`` returns: the model, its step function (trainers/loop.py ``StepFn``), and the
    loop hooks it uses. ``after_backward(model, at)`` runs between the backward pass and the
    optimizer step (gradients unscaled), e.g. to zero the gradients of frozen prototypes;
    ``clip_grad_norm`` clips the global gradient L2 norm to this value, or not at all (None)."""

    model: nn.Module
    step: Callable
    after_backward: Callable[[nn.Module, Any], None] | None = None
    clip_grad_norm: float | None = None


NEGATIVE_KINDS = ("queue", "bank", "batch")


@dataclass(frozen=True)
class Method:
    """One pretraining method. ``config`` is the dataclass of the method's own spec fields, whose
    defaults are its reference recipe; ``preset`` the common pretrain fields (pipeline/spec.py
    ``PretrainSpec``) it changes from MoCo v2's defaults, under the grid's own values.

    - ``build``: "module:function", called as ``function(backbone, pretrain, ctx) -> Training``
      with the frozen PretrainSpec; None for a method that trains nothing (random init).
    - ``views``: augmented views per image the step reads (trainers/augment.py), 1 or 2.
    - ``negatives``: "queue" (K past keys), "bank" (K draws from a memory bank), "batch" (the
      other 2B − 2 views of the batch), or None (no negatives).
    - ``cost_units``: forward-pass equivalents per image, a backward counted as two forwards
      (pipeline/cost.py; MoCo's query fwd+bwd plus key fwd = 4 is the measured anchor).
    - ``data_parallel``: whether it may run as several torch.distributed processes.
    - ``head_prefix``: the checkpoint key prefix of the query/online encoder's head, for the
      inversion stage's z; ``head_hidden_scale``: the head's hidden width as a multiple of the
      backbone's feature width when the spec leaves it unset (None: the feature width).
    - ``shuffle_bn``: it has a momentum key encoder whose BatchNorm shuffle-BN protects.
    - ``identity_common``: the common fields that can change its result (None: all of them).
    """

    name: str
    title: str
    source: str
    config: type = NoConfig
    preset: dict[str, Any] = field(default_factory=dict)
    build: str | None = None
    views: int = 2
    negatives: str | None = None
    cost_units: float = 0.0
    data_parallel: bool = True
    head_prefix: str | None = None
    head_hidden_scale: float | None = None
    shuffle_bn: bool = False
    identity_common: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Raises ValueError (TypeError for ``config``) naming the method and the field for a record
        that could not run as written: every mistake here would otherwise fail silently later
        (a method planned as random init, a queue without K, inversion without z)."""
        def bad(message: str) -> ValueError:
            return ValueError(f"trainers/methods/{self.name}.py: METHOD {message}")

        if not (isinstance(self.config, type) and dataclasses.is_dataclass(self.config)):
            raise TypeError(f"trainers/methods/{self.name}.py: METHOD config must be a dataclass class (Config, "
                            f"not Config())")
        own = {f.name for f in dataclasses.fields(self.config)}
        for f in dataclasses.fields(self.config):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise bad(f"config field {f.name} has no default: a Config's defaults are the method's recipe")
        if self.build is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.build):
            raise bad(f"build = {self.build!r} must be \"module:function\", e.g. \"trainers.methods.{self.name}:build\"")
        if self.negatives not in NEGATIVE_KINDS + (None,):
            raise bad(f"negatives must be one of {', '.join(NEGATIVE_KINDS)} or None")
        if self.negatives in ("queue", "bank") and "K" not in own:
            raise bad(f"has {self.negatives} negatives, so its Config needs the field K")
        if self.views not in (1, 2):
            raise bad("views must be 1 or 2 (the loader draws one or two views per image)")
        if self.build is None:
            found = [what for what, there in (("fields", own), ("a preset", self.preset), ("a cost", self.cost_units),
                                              ("a head_prefix", self.head_prefix)) if there]
            if found:
                raise bad(f"has {' and '.join(found)} but no build: it would run as random init")
        if self.build is not None and self.cost_units <= 0:
            raise bad("needs cost_units > 0 (forward-pass equivalents per image; pipeline/cost.py)")
        if "head" in own and self.head_prefix is None:
            raise bad("has a head but no head_prefix: inversion could not find z in its checkpoint")
        if any(name in own for name in self.preset):
            raise bad(f"preset sets its own fields {sorted(own & set(self.preset))}: give them as Config defaults")

    @property
    def trains(self) -> bool:
        return self.build is not None

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the method's own spec fields."""
        return tuple(f.name for f in dataclasses.fields(self.config))

    def count_negatives(self, config: Any, batch_size: int) -> int | None:
        """How many negatives each query is contrasted with: K for a queue or bank, SimCLR's
        in-batch 2B − 2, None for a method without negatives."""
        if self.negatives == "batch":
            return 2 * batch_size - 2
        return config.K if self.negatives in ("queue", "bank") else None

    def builder(self) -> Callable[..., Training]:
        """The build function, imported now (this imports torch). Raises ValueError for a method
        that trains nothing."""
        if self.build is None:
            raise ValueError(f"method {self.name} trains nothing")
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)

"""The pretraining methods, one module each, in one explicit table.

Adding a method is one module here (its ``Config``, ``build`` and ``METHOD`` record; see
trainers/methods/base.py) plus its name in ``NAMES``. Nothing registers itself by being imported:
the table is read from the modules named below, in this order (the order of error messages), and
importing this package imports no torch.
"""
from __future__ import annotations

import importlib

from trainers.methods.base import Method

NAMES = ("none", "instdisc", "mocov1", "mocov2", "simclr", "byol", "supervised")

METHODS: dict[str, Method] = {name: importlib.import_module(f"trainers.methods.{name}").METHOD for name in NAMES}
DEFAULT = "mocov2"  # the paper's baseline; PretrainSpec's defaults are its recipe


def method(name: str) -> Method:
    """The record of ``name``. Raises KeyError naming the registered methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None

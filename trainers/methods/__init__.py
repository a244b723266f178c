"""The pretraining methods, one module each, in one explicit table.

Adding a method is one module here (its ``Config``, ``build`` and ``METHOD`` record; see
trainers/methods/base.py) plus one line below. Nothing registers itself by being imported, and
importing this package imports no torch.
"""
from __future__ import annotations

from trainers.methods import byol, instdisc, mocov1, mocov2, none, simclr, supervised
from trainers.methods.base import Method

METHODS: dict[str, Method] = {
    "none": none.METHOD,
    "instdisc": instdisc.METHOD,
    "mocov1": mocov1.METHOD,
    "mocov2": mocov2.METHOD,
    "simclr": simclr.METHOD,
    "byol": byol.METHOD,
    "supervised": supervised.METHOD,
}
DEFAULT = "mocov2"  # the paper's baseline; PretrainSpec's defaults are its recipe


def method(name: str) -> Method:
    """The record of ``name``. Raises KeyError naming the registered methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None

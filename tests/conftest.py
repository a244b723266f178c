from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.spec import StageConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """One synthetic-data cache for the whole session (unless the caller set one)."""
    if "SSLGRID_CACHE" not in os.environ:
        os.environ["SSLGRID_CACHE"] = str(tmp_path_factory.mktemp("sslgrid-cache"))
    yield


def tiny_dataset(n_train: int = 96, n_val: int = 48) -> dict:
    return {"name": "synthetic", "root": None, "image_size": 32, "num_train": n_train, "num_val": n_val, "seed": 0,
            "max_train": None, "max_val": None, "download": False}


# the tiny stage tiny_config describes, beyond tiny_dataset()
TINY_BACKBONE = {"name": "tiny_resnet", "bn_splits": 2}
TINY_PRETRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.03, "K": 32, "m": 0.99, "T": 0.2, "seed": 0}
TINY_PROBE = {"epochs": 3, "batch_size": 32}


def tiny_config(*, preset: bool = True, **pretrain) -> StageConfig:
    """A tiny stage (tiny data, tiny backbone) as the frozen StageConfig that stages receive, built as a grid cell is
    (``build_stage_config``: the method's preset under these values); ``pretrain`` takes grid values,
    e.g. ``head={"kind": "none"}``. ``preset=False`` writes out MoCo v2's values of every field, so no
    method's preset applies. Change other fields with dataclasses.replace.
    Raises ValueError naming every problem of the values."""
    from pipeline.spec import PretrainSpec, Problem, build_stage_config, to_dict

    base = to_dict(PretrainSpec()) if not preset else {}
    raw = {"dataset": tiny_dataset(), "backbone": dict(TINY_BACKBONE),
           "pretrain": {**base, **TINY_PRETRAIN, **pretrain}, "linear_probe": dict(TINY_PROBE)}
    problems: list[Problem] = []
    cfg = build_stage_config(raw, problems)
    if problems or cfg is None:
        raise ValueError("tiny_config: " + "; ".join(map(str, problems)))
    return cfg

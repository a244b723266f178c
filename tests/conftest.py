from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def tiny_spec(**pretrain) -> dict:
    """A resolved stage spec as pipeline passes it to trainers: tiny data, tiny backbone."""
    from pipeline.spec import StageConfig, to_dict

    spec = to_dict(StageConfig())
    spec["dataset"] = tiny_dataset()
    spec["backbone"].update(name="tiny_resnet", bn_splits=2)
    spec["pretrain"].update(epochs=2, batch_size=16, lr=0.03, K=32, m=0.99, T=0.2, seed=0)
    spec["pretrain"].update(pretrain)
    spec["linear_probe"].update(epochs=3, batch_size=32)
    return spec

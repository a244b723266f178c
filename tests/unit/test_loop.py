"""A pretraining resumed from its checkpoint equals an uninterrupted one (seeded, CPU)."""
from __future__ import annotations

import pytest
import torch

from trainers import checkpoint
from trainers.pretrain import pretrain
from trainers.sink import ListSink
from tests.conftest import tiny_spec


class Crash(Exception):
    pass


class CrashingSink(ListSink):
    """Dies right after the checkpoint of epoch ``after`` is on disk, as a killed process would."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def progress(self, done: int, total: int) -> None:
        super().progress(done, total)
        if done == self.after:
            raise Crash


def assert_resume_matches_uninterrupted(spec: dict, tmp_path) -> None:
    """A pretraining killed right after epoch 0's checkpoint, then rerun, logs the same later losses
    and ends with bit-equal weights as an uninterrupted run of ``spec``."""
    full = ListSink()
    pretrain(spec, tmp_path / "full", full)

    with pytest.raises(Crash):
        pretrain(spec, tmp_path / "part", CrashingSink(after=1))
    assert checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["epoch"] == 0
    resumed = ListSink()
    pretrain(spec, tmp_path / "part", resumed)

    assert resumed.series("resumed_from_epoch") == [1.0]
    assert resumed.series("loss") == full.series("loss")[1:]
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["backbone"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "final.pt")["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_matches_uninterrupted(tmp_path):
    assert_resume_matches_uninterrupted(tiny_spec(epochs=3), tmp_path)

"""A pretraining resumed from its checkpoint equals an uninterrupted one (seeded, CPU)."""
from __future__ import annotations

import pytest
import torch

from trainers import checkpoint
from trainers.pretrain import pretrain
from trainers.sink import ListSink
from tests.conftest import tiny_config


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


def assert_resume_matches_uninterrupted(spec, tmp_path) -> None:
    """A pretraining killed right after epoch 0's checkpoint, then rerun, logs the same later losses
    and ends with bit-equal weights as an uninterrupted run of ``spec``."""
    full = ListSink()
    pretrain(spec, tmp_path / "full", full)

    with pytest.raises(Crash):
        pretrain(spec, tmp_path / "part", CrashingSink(after=1))
    assert checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["epoch"] == 0
    resumed = ListSink()
    pretrain(spec, tmp_path / "part", resumed)

    assert_same_end(full, resumed, tmp_path)


def assert_same_end(full: ListSink, resumed: ListSink, tmp_path) -> None:
    """The run resumed from epoch 1 in part/ logged the later losses of the one in full/, and ended
    with bit-equal weights."""
    assert resumed.series("resumed_from_epoch") == [1.0]
    # epoch 0's point again, with the time kept in its checkpoint (MLflow keeps an identical point
    # once), then the later epochs' points, as the uninterrupted run logged them
    assert resumed.series("loss") == full.series("loss")
    saved = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["logged_ms"]
    assert resumed.metrics[0][0] == 0 and resumed.stamps[0] == saved[0]
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["backbone"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "final.pt")["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_matches_uninterrupted(tmp_path):
    assert_resume_matches_uninterrupted(tiny_config(epochs=3), tmp_path)


class DiesBeforeLogging(ListSink):
    """A stage that dies after epoch ``after``'s checkpoint was saved and before its metrics were logged."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def log(self, metrics, step, *, timestamp_ms=None):
        if step == self.after and "loss" in metrics:
            raise Crash
        super().log(metrics, step, timestamp_ms=timestamp_ms)


def test_an_epoch_saved_but_not_logged_is_logged_on_resume(tmp_path):
    """Issue 21: a stage killed between an epoch's checkpoint and its log call lost that epoch's point
    (the resume starts after it); a failed save (a full disk) logged a point that the resumed run
    logged again. Saved first, logged after, and the saved epoch logged again on resume with its
    saved time: each epoch's loss reaches the sink, at the time the checkpoint keeps."""
    spec = tiny_config(epochs=3)
    full = ListSink()
    pretrain(spec, tmp_path / "full", full)
    with pytest.raises(Crash):
        pretrain(spec, tmp_path / "part", DiesBeforeLogging(after=1))
    resumed = ListSink()
    pretrain(spec, tmp_path / "part", resumed)
    assert [s for s, m in resumed.metrics if "loss" in m] == [1, 2]
    assert resumed.series("loss") == full.series("loss")[1:]
    saved = checkpoint.load(tmp_path / "part" / "checkpoints" / "last.pt")["logged_ms"]
    assert resumed.stamps[0] == saved[1] and len(saved) == 3


def test_a_truncated_last_checkpoint_falls_back_to_the_one_before(tmp_path):
    """Issue 11 §4: a truncated last.pt failed every rerun with torch's "file is corrupted", naming no
    file. Now the stage resumes from the checkpoint before it, warns naming both, and still ends
    bit-equal to an uninterrupted run."""
    spec = tiny_config(epochs=3)
    full = ListSink()
    pretrain(spec, tmp_path / "full", full)
    with pytest.raises(Crash):
        pretrain(spec, tmp_path / "part", CrashingSink(after=2))
    last = tmp_path / "part" / "checkpoints" / "last.pt"
    assert checkpoint.load(checkpoint.previous(last))["epoch"] == 0
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    resumed = ListSink()
    pretrain(spec, tmp_path / "part", resumed)
    assert len(resumed.warnings) == 1  # through the stage's sink: MLflow and the driver's terminal
    assert f"{last}: cannot be read" in resumed.warnings[0]
    assert f"Resumed from the checkpoint before it, {checkpoint.previous(last)}" in resumed.warnings[0]
    assert_same_end(full, resumed, tmp_path)


def test_unreadable_checkpoints_are_named_with_the_fix(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    checkpoint.atomic_save({"epoch": 0}, last)
    checkpoint.atomic_save({"epoch": 1}, last, keep_previous=True)
    for f in (last, checkpoint.previous(last)):
        f.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_resume(last)
    assert f"{last}: cannot be read" in str(err.value) and f"{checkpoint.previous(last)}: cannot be read" in str(err.value)
    assert f"Delete {last} and {checkpoint.previous(last)} to restart this stage" in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{last}: cannot be read .* Delete it and the DONE file"):
        checkpoint.load(last)  # e.g. an upstream final.pt read by a probe
    assert checkpoint.load_resume(tmp_path / "none.pt") is None

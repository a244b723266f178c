"""Crash-safe writes and the names of a stage folder's files. Standard library only: pipeline/,
trainers/, evaluators/ and cluster/ all write through here.

``atomic_write`` is the one temp-then-rename (after submitit's ``utils.temporary_save_path``):
readers and a crash see the old file or the new one, never half of one. ``StageDir`` (after dora's
``XP``) names the files that pipeline/ and the training loop share in a stage folder; a stage kind's
own artifacts (t-SNE's tsne.png, inversion's inversion.pt) are named by its module and listed in its
record (pipeline/stages.py), and the feature cache and a checkpoint's fallback by theirs
(trainers/features.py, trainers/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@contextlib.contextmanager
def atomic_write(dest: str | Path, *, fsync: bool = False, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (same folder, so the rename is atomic; same suffix,
    so writers that infer the format from it, such as matplotlib's ``savefig``, still can); after the
    block, rename it to ``dest``. An exception in the block removes the temporary path and leaves
    ``dest`` as it was.

    - A file replaces ``dest``; ``fsync`` flushes it to disk first (checkpoints: a power cut must
      not leave a renamed but empty file).
    - ``folder``: the temporary path is created as an empty folder for the block to fill. If
      ``dest`` exists by the time it is renamed (another process published the same content
      first), the temporary folder is removed and ``dest`` kept.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{dest.suffix}")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder:
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost the race to an identical copy
            return
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(dest: str | Path, text: str) -> None:
    """``dest``'s content becomes ``text``, atomically."""
    with atomic_write(dest) as tmp:
        tmp.write_text(text)


@dataclass(frozen=True)
class StageDir:
    """A stage's folder, ``<workdir>/<kind>/<identity>/``, and every file in it.

    - ``spec``: what ran (kind, key, full spec, identity, upstream keys, code hash); written first.
    - ``result``: the stage function's result; ``done``: written last, its presence means the
      stage finished and everything above is in place.
    - ``progress`` (done/total, while it runs), ``status`` (the error of a failed attempt),
      ``warnings`` (one line per warning the stage raised), ``lock`` (held while a process runs it),
      ``slurm`` (its SLURM job, written at submission).
    - ``checkpoints``: ``last`` after every epoch (resume), ``final`` the pretraining's output.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __getattr__(self, name: str):
        """Anything else is the folder's Path's (``exists``, ``mkdir``, ``iterdir``…)."""
        if name.startswith("__") or name == "path":
            raise AttributeError(name)
        return getattr(self.path, name)

    spec = property(lambda self: self.path / "spec.json")
    result = property(lambda self: self.path / "result.json")
    done = property(lambda self: self.path / "DONE")
    progress = property(lambda self: self.path / "progress.json")
    status = property(lambda self: self.path / "status.json")
    warnings = property(lambda self: self.path / "warnings.log")
    lock = property(lambda self: self.path / ".running.lock")
    slurm = property(lambda self: self.path / "slurm.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    final = property(lambda self: self.path / "checkpoints" / "final.pt")

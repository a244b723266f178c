"""Crash-safe checkpoints: write to a temporary file in the same folder, fsync, rename into place.

A resumable checkpoint (``last.pt``) keeps the one before it (``last.prev.pt``), so a file damaged
after it was written (a full disk during a copy, a filesystem that lost its tail) costs one
checkpoint interval, not the stage: ``load_resume`` falls back to it with a warning."""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainers.files import atomic_write


class CheckpointError(Exception):
    """A checkpoint file that cannot be read; the text names the file and what to do."""


def previous(path: Path) -> Path:
    """Where ``atomic_save(..., keep_previous=True)`` keeps the checkpoint before ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """``torch.save`` to ``path`` through a fsynced temporary file and a rename; with
    ``keep_previous`` the file it replaces is kept as ``previous(path)``, moved aside only after the
    new one is safely on disk.

    Raises DiskFullError (an OSError, errno ENOSPC or EDQUOT) naming ``path``, the free bytes left
    there and the fix when the disk or quota fills during the write; ``path`` and its previous
    checkpoint are then exactly as they were (tests/integration/test_faults.py fills a real tmpfs
    mid-stage)."""
    path = Path(path)
    try:
        with atomic_write(path, fsync=True) as tmp:
            # through a Python file, so that the OSError (ENOSPC) stays in the chain: torch.save(obj, str)
            # reports a full disk as "[enforce fail at inline_container.cc] unexpected pos …" alone
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and path.exists():
                os.replace(path, previous(path))
    except (OSError, RuntimeError) as err:
        if not _disk_full(err, path.parent):
            raise
        kept = [str(p) for p in (path, previous(path)) if p.exists()]
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(
            errno.ENOSPC,
            f"{path}: no space left on the disk while writing this checkpoint ({free:,} bytes free in "
            f"{path.parent}). Nothing was replaced: {' and '.join(kept) or 'no earlier checkpoint'} "
            f"{'are' if len(kept) > 1 else 'is'} kept. Free space there (or rerun with --workdir on a larger disk), "
            f"then rerun `sslgrid run`: the stage resumes from its last checkpoint.") from err


class DiskFullError(OSError):
    """A checkpoint could not be written because its disk or quota is full; ``str()`` names the file,
    the free bytes and the fix."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


FULL_MARGIN_BYTES = 1 << 20  # a write that failed with less than this free in its folder ran out of space


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or an error in its chain) is a full disk or quota, by errno; for a torch
    writer error that lost its errno, by less than ``FULL_MARGIN_BYTES`` free in ``folder``."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < FULL_MARGIN_BYTES
    except OSError:
        return False


_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError)


def load(path: Path, fix: str | None = None) -> Any:
    """``torch.load`` on the CPU. Raises CheckpointError naming ``path`` and ``fix`` when the file is
    truncated or corrupt (torch's own message names neither), FileNotFoundError when it is absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except _UNREADABLE as err:
        fix = fix or (f"Delete it and the DONE file beside the stage's result.json (in {path.parent.parent}) "
                      f"so that `sslgrid run` writes it again")
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); the file "
                              f"is truncated or corrupt. {fix}.") from err


def load_resume(path: Path, warn: Callable[[str], None] | None = None) -> Any | None:
    """The state to resume from: ``path``, else the checkpoint kept before it (with a warning naming
    both, to ``warn``, e.g. a stage's ``sink.warn``, or stderr), else None when neither exists.
    Raises CheckpointError naming both files and the fix when neither can be read."""
    path = Path(path)
    tried = []
    for candidate in (path, previous(path)):
        if not candidate.exists():
            continue
        try:
            state = load(candidate)
        except CheckpointError as err:
            tried.append(str(err))
            continue
        if tried:
            message = f"{tried[0].split(' Delete it')[0]} Resumed from the checkpoint before it, {candidate}."
            (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)
        return state
    if tried:
        raise CheckpointError(" ".join(t.split(". Delete")[0] + "." for t in tried)
                              + f" Delete {path} and {previous(path)} to restart this stage from its beginning.")
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

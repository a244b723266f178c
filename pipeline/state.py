"""Reading the small JSON state files of a work directory (``result.json``, ``progress.json``,
``status.json``, ``slurm.json``). They are written by rename (tracking.write_json), so a damaged one
comes from outside: a full disk, a copy cut short, an edit. It is reported with its path and the
fix, never as a bare traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StateError(Exception):
    """A state file that cannot be read; the text names it and the fix."""


def read_json(path: Path, fix: str) -> Any:
    """The JSON in ``path``. Raises StateError naming ``path`` and ``fix`` when it cannot be read or
    parsed, FileNotFoundError when it is absent."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StateError(f"{path}: cannot be read ({type(err).__name__}: {err}). {fix}") from err


def read_json_or(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` when it is absent or damaged (for files that are only
    progress reports, rewritten every epoch)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return default


def rerun_fix(stage_dir: Path) -> str:
    return f"Delete {Path(stage_dir) / 'DONE'} so that `sslgrid run` runs this stage again."

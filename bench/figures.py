"""The GPU check's one JSON file (``--out PATH``), rewritten atomically each time something is
measured, so that a run cut short (a part over its cap, ``timeout 540``, a lost machine) still
leaves every figure measured before the cut.

Layout::

    {"check": "bench/gpu_check.py", "smoke": false, "budget_s": 420, "started": "...",
     "machine": {"nproc": 16, "shm_total_bytes": ..., "shm_free_bytes": ..., "torch": "2.11.0", "card": "..."},
     "parts": {"step": {"status": "ok", "exit_code": 0, "cap_s": 60, "wall_s": 41.2, "card": "...",
                        "figures": {"ours_bf16_images_per_second": {"value": 2710.5, "unit": "images/s", ...}},
                        "error": null}},
     "finished": true, "failed": []}

Only one process writes at a time: the parent between parts, a part while it runs. Standard
library only (the parent imports no torch).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.files import atomic_write


def read(path: Path) -> dict[str, Any]:
    """The JSON document at ``path``; {} when it does not exist yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def update(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read the document, apply ``change`` to it in place, write it back atomically; returns it."""
    doc = read(path)
    change(doc)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=_plain, allow_nan=False))
    return doc


def _plain(value: Any) -> Any:
    """What json cannot write by itself: tuples are lists already; numbers with .item() (numpy, torch)."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as strings, visibly."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Figures:
    """A part's figures: ``add`` prints one line (prefixed by the card's name) and writes the figure
    into ``parts.<part>.figures`` of the JSON at once."""

    def __init__(self, path: Path, part: str, card: str, hang_after_first: bool = False) -> None:
        self.path, self.part, self.card = Path(path), part, card
        self._hang = hang_after_first

    def add(self, name: str, value: Any, unit: str, text: str | None = None, quiet: bool = False,
            **context: Any) -> None:
        """Record figure ``name`` (``value`` in ``unit``) with its context (batch size, window...)
        and print ``text`` (default: "name = value unit"; nothing with ``quiet``)."""
        entry = {"value": _finite(value), "unit": unit, **{k: _finite(v) for k, v in context.items()}}

        def put(doc: dict[str, Any]) -> None:
            doc.setdefault("parts", {}).setdefault(self.part, {}).setdefault("figures", {})[name] = entry

        update(self.path, put)
        shown = value if not isinstance(value, float) else f"{value:.4g}"
        if not quiet:
            print(f"[{self.card}] {self.part}: {text or f'{name} = {shown} {unit}'}", flush=True)
        if self._hang:  # tests: a part that hangs after its first figure (SSLGRID_GPU_CHECK_FAIL=<part>:hang)
            import time

            time.sleep(3600)

    def note(self, text: str) -> None:
        """A line of context, printed and kept in ``parts.<part>.notes``."""
        update(self.path, lambda doc: doc.setdefault("parts", {}).setdefault(self.part, {})
               .setdefault("notes", []).append(text))
        print(f"[{self.card}] {self.part}: {text}", flush=True)


def shm_bytes() -> tuple[int | None, int | None]:
    """(/dev/shm's size, its free bytes), or (None, None) where there is none (not Linux)."""
    import shutil

    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError:
        return None, None
    return usage.total, usage.free


def nproc() -> int:
    """CPUs this process may run on (what ``nproc`` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

"""A frozen copy of sslgrid's own code for the stages of one ``sslgrid run``.

Researchers edit the code while a grid runs. Without a copy, a stage that starts later imports the
edited (or half-edited) modules: seen here, a Ray worker that started while ``pipeline/`` was being
edited failed with an ImportError. dora keeps a copy of the code per experiment for the same reason.
``sslgrid run`` copies the four packages into ``<workdir>/.code/<hash>/`` (the hash is over the
files' paths and contents, so an unchanged tree reuses its copy), and the backends import from it:
Ray ships it as the job's ``working_dir`` (to every node of a joined cluster too), SLURM jobs start
in it. Each stage's MLflow run is tagged with the hash (``sslgrid.code``) and with the folder its
worker imported sslgrid from (``sslgrid.code_path``). The copy changes no stage identity.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from trainers.files import atomic_write

PACKAGES = ("pipeline", "trainers", "evaluators", "cluster")


def source_root() -> Path:
    """The folder these packages are imported from (a checkout, or a snapshot itself)."""
    return Path(__file__).resolve().parents[1]


def source_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")
                  if "__pycache__" not in p.parts)


def code_hash(root: Path) -> str:
    h = hashlib.sha1()
    for rel in source_files(root):
        h.update(str(rel).encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def snapshot(workdir: Path, root: Path | None = None) -> Path:
    """Copy the packages under ``root`` (default: this checkout) to ``workdir/.code/<hash>/`` unless
    that copy exists; returns its path. The copy is written to a temporary folder and renamed into
    place, so a crash leaves no partial copy under the final name."""
    root = root or source_root()
    dest = Path(workdir) / ".code" / code_hash(root)
    if dest.exists():
        return dest
    with atomic_write(dest, folder=True) as tmp:  # another run may publish the same copy first
        for rel in source_files(root):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
    return dest

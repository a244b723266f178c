"""The per-run copy of sslgrid's code: content-addressed, complete, reused, never partial."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.snapshot import PACKAGES, code_hash, snapshot, source_files, source_root


def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for pkg in PACKAGES:
        shutil.copytree(source_root() / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_snapshot_copies_every_module_and_is_reused(tmp_path):
    root = checkout(tmp_path)
    snap = snapshot(tmp_path / "work", root)
    assert snap.name == code_hash(root) and snap.parent == tmp_path / "work" / ".code"
    assert source_files(snap) == source_files(root)
    assert all((snap / f).read_bytes() == (root / f).read_bytes() for f in source_files(root))
    assert {"pipeline/cli.py", "trainers/optim.py", "cluster/slurm_backend.py"} <= {str(f) for f in source_files(snap)}
    (root / "pipeline" / "__pycache__").mkdir(exist_ok=True)
    (root / "pipeline" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")  # bytecode is not code
    assert snapshot(tmp_path / "work", root) == snap
    assert [p.name for p in snap.parent.iterdir()] == [snap.name]  # no partial copies left


def test_an_edit_makes_a_new_copy_and_leaves_the_old_one(tmp_path):
    root = checkout(tmp_path)
    first = snapshot(tmp_path / "work", root)
    with open(root / "trainers" / "optim.py", "a") as f:
        f.write("\n# edited\n")
    second = snapshot(tmp_path / "work", root)
    assert second != first and second.name == code_hash(root)
    assert "# edited" in (second / "trainers" / "optim.py").read_text()
    assert "# edited" not in (first / "trainers" / "optim.py").read_text()

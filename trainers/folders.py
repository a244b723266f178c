"""An ImageFolder tree's classes and images, read from the file system alone: no torch, so that
``sslgrid plan`` checks a grid's data on a login node. trainers/data.py re-exports all of it."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class DataError(Exception):
    """A dataset problem the user must fix (a corrupt file, a missing folder)."""


def _hidden(name: str) -> bool:
    """Dot entries (``.ipynb_checkpoints``, ``.DS_Store``, macOS's ``._x.jpg``) are never classes or images."""
    return name.startswith(".")


def class_folders(split_root: Path) -> tuple[str, ...]:
    """The class folders of one split, sorted: every sub-folder except hidden (dot) ones."""
    return tuple(sorted(d.name for d in Path(split_root).iterdir() if d.is_dir() and not _hidden(d.name)))


def image_files(folder: Path, first: bool = False) -> list[Path]:
    """The image files under a class folder, sorted, walked recursively (following links) as
    torchvision's ``ImageFolder`` does, without hidden files or folders; only the first with ``first``."""
    found: list[Path] = []
    for here, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(names):
            if not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(here) / name)
                if first:
                    return found
    return found


def imagefolder_classes(root: Path, splits: Sequence[str] = ("train", "val")) -> tuple[str, ...]:
    """The one class list of an ImageFolder root, read from ``train/`` and shared by every split, so a
    label means the same class in each. Cheap: one directory listing per class and split, stopping
    at the first image.

    Raises DataError naming the folders when a split is missing, has no class folders, has classes
    that differ from train's, or has a class folder with no images."""
    root = Path(root)
    found: dict[str, tuple[str, ...]] = {}
    problems = []
    for split in splits:
        if not (root / split).is_dir():
            problems.append(f"{root / split}: no such folder. An ImageFolder dataset needs <root>/train/<class>/ "
                            f"and <root>/val/<class>/ (set dataset.root).")
            continue
        found[split] = class_folders(root / split)
        if not found[split]:
            problems.append(f"{root / split}: no class folders inside. Expected {root / split}/<class>/<image files>.")
    reference = found.get(splits[0], ())
    for split, classes in found.items():
        if split == splits[0] or not classes or not reference:
            continue
        missing, extra = sorted(set(reference) - set(classes)), sorted(set(classes) - set(reference))
        if missing or extra:
            text = [f"{root / split} has different classes from {root / splits[0]}"]
            if missing:
                text.append(f"missing from {split}/: {_names(missing)}")
            if extra:
                text.append(f"not in {splits[0]}/: {_names(extra)}")
            problems.append("; ".join(text) + ". Every split needs the same class folders, or labels would "
                            "name different classes; add or remove folders so they match.")
    for split, classes in found.items():
        empty = [c for c in classes if not image_files(root / split / c, first=True)]
        if empty:
            problems.append(f"{root / split}: class folders with no image files ({', '.join(IMAGE_EXTENSIONS)}): "
                            f"{_names(empty)}. Add images or remove these folders from every split.")
    if problems:
        raise DataError("\n".join(problems))
    return reference


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"{n}/" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

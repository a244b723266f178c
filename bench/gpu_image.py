"""What the GPU machine's Python holds, in one place: the check (bench/gpu_check.py) must run with
only these packages, and tests/unit/test_gpu_image.py runs it with everything else blocked.

The list itself is bench/gpu-image-packages.txt, a copy of ``../shared/gpu-image-packages.txt`` (read
on the machine on 2026-11-17: torch 2.11, torchvision 0.26, no network), committed so that a clone
without the shared folder can still check against it; the test compares the two when the shared
one exists. Standard library only: the check's parent process imports it before anything else.
"""
from __future__ import annotations

import re
from pathlib import Path

IMAGE_LIST = Path(__file__).with_name("gpu-image-packages.txt")
SHARED_LIST = Path(__file__).resolve().parents[1].parent / "shared" / "gpu-image-packages.txt"

# The project's dependencies (pyproject.toml) that the image lacks, distribution → the module it is
# imported as. The check works without them: YAML through bench/yaml12.py, no Ray, MLflow, submitit,
# COCO evaluation or PostgreSQL driver. tests/unit/test_gpu_image.py keeps this equal to pyproject's list
# minus the image's.
MISSING: dict[str, str] = {"ruamel.yaml": "ruamel", "ray": "ray", "mlflow": "mlflow", "submitit": "submitit",
                           "pycocotools": "pycocotools", "psycopg": "psycopg"}


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    """The image's distributions (normalised names) from a list of one name a line, ``#`` comments.
    Raises FileNotFoundError when ``path`` is absent."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalise(line))
    return names

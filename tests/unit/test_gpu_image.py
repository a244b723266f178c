"""The GPU machine's packages (bench/gpu_image.py) and the check's YAML 1.2 reader without
ruamel.yaml (bench/yaml12.py): the list stays the machine's, and the reader plans every grid as
the main tool does."""
from __future__ import annotations

import math
import re
import sys
import tomllib
from pathlib import Path

import pytest

from bench import yaml12
from bench.gpu_image import IMAGE_LIST, MISSING, SHARED_LIST, image_packages, normalise
from pipeline.grid import load_grid, load_yaml
from pipeline.plan import build_plan

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not SHARED_LIST.exists(), reason=f"{SHARED_LIST} is not on this machine")
def test_the_committed_list_is_the_gpu_machines():
    assert image_packages(IMAGE_LIST) == image_packages(SHARED_LIST)


def test_missing_is_what_the_project_needs_beyond_the_image():
    """MISSING names exactly pyproject's dependencies that the image lacks, as the modules that a
    blocked import would name."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {normalise(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps}
    assert names - image_packages() == {normalise(d) for d in MISSING}
    import importlib.util

    for module in MISSING.values():  # installed here, so each name is a real module to block
        assert importlib.util.find_spec(module) is not None, module


SCALARS = ["1e-4", "1E4", "1.5e3", "1e4", "010", "0o10", "0x1F", "0b101", "1_000", "+12", "-3", "1:30", "yes", "no",
           "on", "off", "y", "n", "True", "TRUE", "true", "FALSE", "~", "null", "Null", "NULL", "", "2001-12-14",
           "2001-12-14t21:59:43.10-05:00", ".inf", "-.inf", ".NaN", ".5", "5.", "-.5e3", "-.5e+3", "0.", "1e",
           "1.0e+3", "0", "-0", "+0.5", "!!str 1", "'1'", "0o19", "09", "1.2.3", "1,000", "[1, 2]", "{a: 1}",
           "0.03", "5.0e-4", "[0.2, 1.0]", "mlp", "resnet50", "/data/imagenet"]


@pytest.mark.parametrize("text", SCALARS)
def test_yaml12_reads_a_value_as_ruamel_does(text):
    ours, theirs = yaml12.load(f"k: {text}\n")["k"], load_yaml(f"k: {text}\n")["k"]
    if isinstance(theirs, float) and math.isnan(theirs):
        assert isinstance(ours, float) and math.isnan(ours)
    else:
        assert (ours, type(ours)) == (theirs, type(theirs))


def test_yaml12_refuses_a_key_written_twice_and_keeps_merges():
    import yaml

    for text in ("a: 1\na: 2\n", "a: {x: 1, x: 2}\n"):
        with pytest.raises(yaml.YAMLError, match="duplicate key"):
            yaml12.load(text)
    merged = "b: &x {p: 1, q: 2}\nc:\n  <<: *x\n  q: 3\n"
    assert yaml12.load(merged) == load_yaml(merged) == {"b": {"p": 1, "q": 2}, "c": {"p": 1, "q": 3}}


@pytest.mark.parametrize("grid", sorted((REPO / "grids").glob("*.yaml")), ids=lambda p: p.name)
def test_both_readers_plan_every_grid_alike(grid, monkeypatch):
    """The check reads the quickstart through the shim; every grid gives the same document, stage
    keys and resolved specs through either reader (overrides parsed too)."""
    over = ["pretrain.lr=1e-4"]
    text = grid.read_text()

    def plan_of() -> tuple[dict, dict]:
        plan = build_plan(load_grid(grid, over))
        return load_yaml(text), {k: s.spec for k, s in plan.stages.items()}

    doc, specs = plan_of()
    for name, module in yaml12.ruamel_shim().items():
        monkeypatch.setitem(sys.modules, name, module)
    from ruamel.yaml import YAML

    assert YAML is yaml12.YAML  # the shim is what pipeline/grid.py reads with now
    assert plan_of() == (doc, specs)
    assert specs

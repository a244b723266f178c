"""The registries are the only places that name a method or a stage kind (issue 12): pipeline/
iterates them, and validating a grid needs no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from pipeline.stages import STAGE_KINDS
from trainers.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
# the registries themselves, and the module that redraws the paper's tables, whose rows are the
# paper's methods (MoCo v2 against supervised training) and whose values are its protocol's probe
ALLOWED = {"stages.py", "paper_tables.py"}


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    named = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["ROOT"]}  # the one name of the root kind
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in named]


def test_no_pipeline_module_names_a_method_or_a_stage_kind():
    # "none" (random init) is also a value of other fields (head kind, lr scaling), so it is not searched for
    names = (set(METHODS) - {"none"}) | set(STAGE_KINDS)
    found = [f"pipeline/{p.name}:{line}: {value!r}" for p in sorted((REPO / "pipeline").glob("*.py"))
             if p.name not in ALLOWED for line, value in _string_constants(p) if value in names]
    assert not found, "\n".join(found)


def test_a_grid_is_validated_planned_and_costed_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "import pipeline.spec, pipeline.stages, pipeline.plan, pipeline.cost\n"
            "from pipeline.grid import load_grid\n"
            "from pipeline.plan import build_plan, describe\n"
            "for g in ('quickstart', 'methods', 'paper', 'paper-mini'):\n"
            "    rows = describe(build_plan(load_grid(f'grids/{g}.yaml', workdir='/tmp/x', tracking_uri='sqlite:////tmp/x.db')))\n"
            "    assert rows\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_each_record_is_filed_under_its_own_name():
    assert all(name == m.name for name, m in METHODS.items())
    assert all(name == k.name for name, k in STAGE_KINDS.items())
